//! The DDPM noise-schedule goldens (`sched.*`), made with diffusers' DDPMScheduler.

use crate::common::*;
use sdtune::schedule::NoiseSchedule;

#[test]
fn alphas_cumprod_add_noise_and_velocity_match_diffusers() {
    for m in MODELS {
        let g = goldens(&format!("{m}/golden.safetensors"));
        let s = NoiseSchedule::sd();
        let ours = candle_core::Tensor::new(s.alphas_cumprod.as_slice(), &candle_core::Device::Cpu).unwrap();
        assert_close(&format!("{m} sched.alphas_cumprod"), &ours, &g["sched.alphas_cumprod"], 1e-7);
        let x0 = candle_core::Tensor::cat(&[&g["sched.in.x0"], &g["sched.in.x0"]], 0).unwrap();
        let noise = candle_core::Tensor::cat(&[&g["sched.in.noise"], &g["sched.in.noise"]], 0).unwrap();
        let t = &g["sched.in.timesteps"];
        assert_close(
            &format!("{m} sched.out.add_noise"),
            &s.add_noise(&x0, &noise, t).unwrap(),
            &g["sched.out.add_noise"],
            1e-6,
        );
        assert_close(
            &format!("{m} sched.out.velocity"),
            &s.velocity(&x0, &noise, t).unwrap(),
            &g["sched.out.velocity"],
            1e-6,
        );
    }
}

#[test]
fn out_of_range_timestep_is_an_error() {
    let s = NoiseSchedule::sd();
    let x = candle_core::Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let t = candle_core::Tensor::new(&[1000i64], &candle_core::Device::Cpu).unwrap();
    let err = s.add_noise(&x, &x, &t).unwrap_err().to_string();
    assert!(err.contains("timestep 1000"), "{err}");
}
