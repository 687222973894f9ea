//! Device and dtype names as scripts and the CLI spell them.

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// Parses `"f32"`, `"f16"`, `"bf16"`, `"f64"`, `"i64"`, `"u8"`, `"u32"`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" | "fp32" => DType::F32,
        "f16" | "float16" | "fp16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        "f64" | "float64" => DType::F64,
        "i64" | "int64" => DType::I64,
        "u8" | "uint8" => DType::U8,
        "u32" | "uint32" => DType::U32,
        other => bail!(
            "unknown dtype {other:?}; expected one of \"f32\", \"f16\", \"bf16\", \"f64\", \"i64\", \"u8\", \"u32\""
        ),
    })
}

/// The script name of a dtype.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        DType::I64 => "i64",
        DType::U8 => "u8",
        DType::U32 => "u32",
        _ => "other",
    }
}

/// Marks of running out of GPU memory in an error chain (CUDA's allocator, cuBLAS's workspace).
const OUT_OF_MEMORY: &[&str] = &["CUDA_ERROR_OUT_OF_MEMORY", "CUBLAS_STATUS_ALLOC_FAILED"];

/// What to do about running out of GPU memory, appended to such an error.
const OUT_OF_MEMORY_HINT: &str = "the GPU ran out of memory: lower train_batch_size or the resolution, turn on \
    gradient_checkpointing, use mixed_precision \"bf16\" (or \"fp16\"), cache_latents, optimizer_type \"AdamW8bit\", or \
    close other programs using the GPU";

/// An error message with what the user can do about it appended, where the cause is one they can act on (out of
/// GPU memory); other messages unchanged. Adding it twice adds it once.
pub fn with_hint(msg: String) -> String {
    if OUT_OF_MEMORY.iter().any(|m| msg.contains(m)) && !msg.contains(OUT_OF_MEMORY_HINT) {
        format!("{msg} — {OUT_OF_MEMORY_HINT}")
    } else {
        msg
    }
}

/// The default device: the first CUDA GPU when built with CUDA and one is present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = cuda(0) {
        return d;
    }
    Device::Cpu
}

/// GPU `ordinal`, the same device for every caller: candle refuses to mix tensors of two devices made for one GPU,
/// and each would hold its own cuBLAS handle and kernel modules.
#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = devices.iter().find(|(o, _)| *o == ordinal) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda(ordinal)?;
    if let Device::Cuda(c) = &d {
        // SAFETY: candle runs all work of a device on one stream and sdtune makes no other stream; cudarc's
        // per-buffer events only synchronise several streams, yet cost two event creations per allocation.
        unsafe { c.disable_event_tracking() };
    }
    devices.push((ordinal, d.clone()));
    Ok(d)
}

/// Parses `"cpu"`, `"cuda"`, `"cuda:N"`.
pub fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => bail!("unknown device {s:?}; expected \"cpu\", \"cuda\" or \"cuda:N\""),
        },
        None => bail!("unknown device {s:?}; expected \"cpu\", \"cuda\" or \"cuda:N\""),
    };
    #[cfg(feature = "cuda")]
    return Ok(cuda(ordinal)?);
    #[cfg(not(feature = "cuda"))]
    bail!("device {s:?} (GPU {ordinal}): this sdtune was built without CUDA (build with `--features cuda`)")
}

/// The script name of a device.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Lets candle's CPU kernels use every logical core: candle counts physical cores by default, which on
/// hyper-threaded or small virtual machines halves the threads (measured 2× slower training steps on a 2-vCPU
/// machine, BENCHMARKS.md). `RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`, when set, are left alone. Call first
/// thing in `main`, before any thread starts.
pub fn use_all_cores() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() && std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        if let Ok(n) = std::thread::available_parallelism() {
            std::env::set_var("RAYON_NUM_THREADS", n.get().to_string());
        }
    }
}

/// Keeps freed memory in the process for reuse: candle allocates a fresh buffer for every op's result, and glibc
/// serves blocks above its (adaptive) mmap threshold with fresh pages, paying a page fault per 4 KiB at first write
/// and returning them at free. Blocks up to 32 MiB now come from the heap, which keeps freed memory (measured: a
/// 3×3 convolution over [2, 64, 32, 32] on the CPU 5.3 → 2.6 ms). Call first thing in `main`.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_gpu_memory_says_what_to_change() {
        // cudarc's driver error as candle passes it on, inside a chain
        let oom = r#"conv2d (+ adapters) backward: DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#;
        let msg = with_hint(oom.to_string());
        assert!(msg.starts_with(oom) && msg.contains("gradient_checkpointing") && msg.contains("AdamW8bit"), "{msg}");
        assert_eq!(with_hint(msg.clone()), msg, "the hint is added once");
        assert!(with_hint("matmul: CublasError(CUBLAS_STATUS_ALLOC_FAILED)".into()).contains("ran out of memory"));
        let other = "model.safetensors: not a safetensors file".to_string();
        assert_eq!(with_hint(other.clone()), other);
    }
}
