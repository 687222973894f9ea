//! Caption processing in sd-scripts' order (`process_caption`): prefix/suffix, dropout, wildcards, keep-tokens split,
//! token warmup, shuffle, tag dropout, secondary separator.

use super::config::CaptionOptions;
use crate::rng::Rng;

/// Where training is, for dropout-every-n-epochs and token warmup.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub epoch: usize,
    pub step: usize,
    pub max_train_steps: usize,
}

/// `{a|b|c}` → one choice; `{{`/`}}` are literal braces.
fn wildcards(caption: &str, rng: &mut Rng) -> String {
    let s = caption.replace("{{", "\u{2985}").replace("}}", "\u{2986}");
    let mut out = String::new();
    let mut rest = s.as_str();
    while let Some(open) = rest.find('{') {
        match rest[open + 1..].find('}') {
            Some(len) if len > 0 => {
                out.push_str(&rest[..open]);
                let options: Vec<&str> = rest[open + 1..open + 1 + len].split('|').collect();
                out.push_str(options[rng.below(options.len())]);
                rest = &rest[open + 2 + len..];
            }
            _ => {
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
            }
        }
    }
    out.push_str(rest);
    out.replace('\u{2985}', "{").replace('\u{2986}', "}")
}

fn tags(part: &str, sep: &str) -> Vec<String> {
    part.split(sep).map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()
}

/// The caption a sample gets this time.
pub fn process_caption(caption: &str, o: &CaptionOptions, p: Progress, rng: &mut Rng) -> String {
    let mut caption = caption.to_string();
    if let Some(prefix) = &o.caption_prefix {
        caption = format!("{prefix} {caption}");
    }
    if let Some(suffix) = &o.caption_suffix {
        caption = format!("{caption} {suffix}");
    }
    let dropped = (o.caption_dropout_rate > 0.0 && rng.uniform() < o.caption_dropout_rate)
        || (o.caption_dropout_every_n_epochs > 0 && p.epoch % o.caption_dropout_every_n_epochs == 0);
    if dropped {
        return String::new();
    }
    if o.enable_wildcard {
        if caption.contains('\n') {
            let lines: Vec<&str> = caption.split('\n').collect();
            caption = lines[rng.below(lines.len())].to_string();
        }
        caption = wildcards(&caption, rng);
    } else {
        caption = caption.split('\n').next().unwrap_or("").to_string();
    }
    let warmup_step = if o.token_warmup_step < 1.0 {
        (o.token_warmup_step * p.max_train_steps as f64).floor()
    } else {
        o.token_warmup_step
    };
    if o.shuffle_caption || warmup_step > 0.0 || o.caption_tag_dropout_rate > 0.0 {
        let sep = o.caption_separator.as_str();
        let kts = o.keep_tokens_separator.as_str();
        let (fixed, mut flex, suffix) = if !kts.is_empty() && caption.contains(kts) {
            let (fixed, flex) = caption.split_once(kts).expect("contains the separator");
            let (flex, suffix) = match flex.split_once(kts) {
                Some((f, s)) => (f, tags(s, sep)),
                None => (flex, Vec::new()),
            };
            (tags(fixed, sep), tags(flex, sep), suffix)
        } else {
            let all: Vec<String> = caption.trim().split(sep).map(|t| t.trim().to_string()).collect();
            let k = o.keep_tokens.min(all.len());
            (all[..k].to_vec(), all[k..].to_vec(), Vec::new())
        };
        if warmup_step > 0.0 && (p.step as f64) < warmup_step {
            let len = (p.step as f64 * ((flex.len() as f64 - o.token_warmup_min as f64) / warmup_step)).floor() as i64
                + o.token_warmup_min as i64;
            flex.truncate(len.max(0) as usize);
        }
        if o.shuffle_caption {
            rng.shuffle(&mut flex);
        }
        if o.caption_tag_dropout_rate > 0.0 {
            flex.retain(|_| rng.uniform() >= o.caption_tag_dropout_rate);
        }
        caption = fixed.into_iter().chain(flex).chain(suffix).collect::<Vec<_>>().join(", ");
    }
    if let Some(sec) = &o.secondary_separator {
        caption = caption.replace(sec.as_str(), &o.caption_separator);
    }
    caption
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> CaptionOptions {
        CaptionOptions::default()
    }

    fn run(c: &str, o: &CaptionOptions, seed: u64) -> String {
        process_caption(c, o, Progress { epoch: 1, step: 0, max_train_steps: 100 }, &mut Rng::new(seed))
    }

    #[test]
    fn plain_caption_is_first_line_with_prefix_and_suffix() {
        let mut o = opts();
        assert_eq!(run("a, b\nsecond", &o, 1), "a, b");
        o.caption_prefix = Some("pre".into());
        o.caption_suffix = Some("post".into());
        assert_eq!(run("a, b", &o, 1), "pre a, b post");
    }

    #[test]
    fn shuffle_keeps_the_first_keep_tokens_and_every_tag() {
        let mut o = opts();
        o.shuffle_caption = true;
        o.keep_tokens = 2;
        let c = "k1, k2, a, b, c, d, e, f";
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let out = run(c, &o, seed);
            assert!(out.starts_with("k1, k2, "), "{out}");
            let mut got: Vec<&str> = out.split(", ").collect();
            got.sort();
            assert_eq!(got, vec!["a", "b", "c", "d", "e", "f", "k1", "k2"]);
            seen.insert(out);
        }
        assert!(seen.len() > 10, "shuffling varies with the seed");
        assert_eq!(run(c, &o, 7), run(c, &o, 7), "same seed, same caption");
    }

    #[test]
    fn keep_tokens_separator_fixes_prefix_and_suffix() {
        let mut o = opts();
        o.shuffle_caption = true;
        o.keep_tokens_separator = "|||".into();
        for seed in 0..10 {
            let out = run("p1, p2 ||| a, b, c ||| s1, s2", &o, seed);
            assert!(out.starts_with("p1, p2, ") && out.ends_with(", s1, s2"), "{out}");
        }
        // without the separator in the caption, keep_tokens applies
        o.keep_tokens = 1;
        assert!(run("first, x, y", &o, 3).starts_with("first, "));
    }

    #[test]
    fn dropout_rates_and_every_n_epochs() {
        let mut o = opts();
        o.caption_dropout_rate = 0.5;
        let dropped = (0..400).filter(|&s| run("a cat", &o, s).is_empty()).count();
        assert!((150..250).contains(&dropped), "{dropped} of 400 dropped at rate 0.5");
        let mut o = opts();
        o.caption_dropout_every_n_epochs = 3;
        let at =
            |epoch| process_caption("a cat", &o, Progress { epoch, step: 0, max_train_steps: 1 }, &mut Rng::new(0));
        assert_eq!((at(3), at(4), at(6)), (String::new(), "a cat".to_string(), String::new()));
        let mut o = opts();
        o.caption_tag_dropout_rate = 0.5;
        o.keep_tokens = 1;
        let out: Vec<String> = (0..200).map(|s| run("keep, a, b, c, d", &o, s)).collect();
        assert!(out.iter().all(|c| c.starts_with("keep")));
        let tags: usize = out.iter().map(|c| c.split(", ").count() - 1).sum();
        assert!((300..500).contains(&tags), "{tags} of 800 flexible tags kept at rate 0.5");
    }

    #[test]
    fn wildcards_pick_options_and_lines() {
        let mut o = opts();
        o.enable_wildcard = true;
        let mut seen = std::collections::BTreeSet::new();
        for s in 0..50 {
            let out = run("a {red|green|blue} {{literal}} ball", &o, s);
            seen.insert(out.clone());
            assert!(out.ends_with(" {literal} ball"), "{out}");
        }
        assert_eq!(seen.len(), 3);
        let lines: std::collections::BTreeSet<String> = (0..50).map(|s| run("line one\nline two", &o, s)).collect();
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn token_warmup_grows_the_tag_count() {
        let mut o = opts();
        o.token_warmup_step = 10.0;
        o.token_warmup_min = 1;
        let at = |step| {
            process_caption("a, b, c, d, e", &o, Progress { epoch: 0, step, max_train_steps: 100 }, &mut Rng::new(0))
        };
        // floor(step·(5−1)/10) + 1 tags
        assert_eq!(at(0), "a");
        assert_eq!(at(5), "a, b, c");
        assert_eq!(at(9), "a, b, c, d");
        assert_eq!(at(10), "a, b, c, d, e");
        // a fraction of max_train_steps
        o.token_warmup_step = 0.1;
        assert_eq!(
            process_caption(
                "a, b, c, d, e",
                &o,
                Progress { epoch: 0, step: 5, max_train_steps: 100 },
                &mut Rng::new(0)
            ),
            "a, b, c"
        );
    }

    #[test]
    fn secondary_separator_joins_after_shuffle() {
        let mut o = opts();
        o.shuffle_caption = true;
        o.secondary_separator = Some(";;;".into());
        for s in 0..10 {
            let out = run("a;;;b, c, d", &o, s);
            assert!(out.contains("a,b"), "{out}");
        }
    }
}
