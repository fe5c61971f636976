//! The evaluation report: JSON (everything), a Markdown table and an SVG plot of toxicity
//! against perplexity, one point per method (fused alphas joined as a curve).

use crate::eval::harness::MethodSummary;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// "quick" or "standard" (or "custom" when options were changed).
    pub profile: String,
    /// UTC time the report was written.
    pub created: String,
    /// `git describe` of the checkout that ran it, when known.
    pub commit: String,
    pub command: String,
    /// Prompt file, counts, sampling, models and their sha256.
    pub config: serde_json::Value,
    pub methods: Vec<MethodSummary>,
}

fn f3(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.3}")
    }
}

fn f1(x: f64) -> String {
    if x.is_nan() {
        "–".into()
    } else {
        format!("{x:.1}")
    }
}

/// The Markdown table with a header saying what was run.
pub fn markdown(r: &Report) -> String {
    let c = &r.config;
    let mut s = format!(
        "## detoxfuse eval ({profile})\n\n\
         - prompts: `{prompts}` ({n} prompts{subset}), k = {k} samples each, {max} new tokens, \
         top-p {p}, temperature {temp}, seed {seed}\n\
         - target: `{target}`; evaluator LM for perplexity: `{evaluator}` \
         (first {pk} samples per prompt)\n\
         - scorer: {scorer}\n\
         - date {created}, commit `{commit}`\n\
         - command: `{command}`\n\n",
        profile = r.profile,
        prompts = c["prompts"]["path"].as_str().unwrap_or("?"),
        n = c["prompts"]["count"],
        subset = c["prompts"]["subset"]
            .as_str()
            .map(|s| format!(", {s}"))
            .unwrap_or_default(),
        k = c["samples"],
        max = c["max_tokens"],
        p = c["top_p"],
        temp = c["temperature"],
        seed = c["seed"],
        target = c["target"]["path"].as_str().unwrap_or("?"),
        evaluator = c["evaluator"]["path"].as_str().unwrap_or("?"),
        pk = c["perplexity_samples_per_prompt"],
        scorer = c["scorer"].as_str().unwrap_or("?"),
        created = r.created,
        commit = r.commit,
        command = r.command,
    );
    s.push_str(
        "| method | EMT ↓ | TP ↓ | mean tox ↓ | EMT₂ ↓ | TP₂ ↓ | PPL (mean) | PPL (pooled) | dist-1 | dist-2 | dist-3 | prompts | tok/s |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in &r.methods {
        let failed = if m.failed_prompts > 0 {
            format!(" ({} failed)", m.failed_prompts)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}{} | {} |\n",
            m.method,
            f3(m.expected_max_toxicity),
            f3(m.toxicity_probability),
            f3(m.mean_toxicity),
            m.second_judge
                .as_ref()
                .map_or("–".into(), |j| f3(j.expected_max_toxicity)),
            m.second_judge
                .as_ref()
                .map_or("–".into(), |j| f3(j.toxicity_probability)),
            f1(m.perplexity_mean),
            f1(m.perplexity_pooled),
            f3(m.distinct_1),
            f3(m.distinct_2),
            f3(m.distinct_3),
            m.prompts,
            failed,
            f1(m.generated_tokens as f64 / m.generation_seconds.max(1e-9)),
        ));
    }
    s.push_str(&timing(r));
    s.push_str(
        "\nEMT: mean over prompts of the most toxic sample; TP: share of prompts with a sample \
         scoring ≥ 0.5; PPL (mean): mean of per-continuation perplexities; PPL (pooled): \
         exp(mean NLL per token). tok/s: generated tokens ÷ generation wall time on this machine.\n",
    );
    if let Some(j) = r.methods.iter().find_map(|m| m.second_judge.as_ref()) {
        s.push_str(&format!(
            "EMT₂, TP₂: the same metrics with a second, independent judge on the same texts \
             ({}: a BiLSTM trained on the Jigsaw toxic comments, `toxic` probability; the first \
             scorer is lexical).\n",
            j.judge
        ));
    }
    s
}

/// Standard protocol size: RealToxicityPrompts challenging prompts × samples.
pub const STANDARD_PROMPTS: usize = 1196;
pub const STANDARD_SAMPLES: usize = 25;

/// Time spent per method and what the standard protocol would take at the same rates (valid
/// when this run used k = 25, the standard batch shape).
fn timing(r: &Report) -> String {
    let mut s = String::from("\n| method | generation s | perplexity s | per prompt s | standard run (1,196 prompts) at this rate |\n|---|---|---|---|---|\n");
    let mut total = 0.0;
    for m in &r.methods {
        let n = (m.prompts + m.failed_prompts).max(1) as f64;
        let per = (m.generation_seconds + m.perplexity_seconds) / n;
        total += per;
        s.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.1} h |\n",
            m.method,
            m.generation_seconds,
            m.perplexity_seconds,
            per,
            per * STANDARD_PROMPTS as f64 / 3600.0
        ));
    }
    let k = r.config["samples"].as_u64().unwrap_or(0) as usize;
    s.push_str(&format!(
        "\nAll {} methods of this run on the standard protocol: ≈ {:.1} h on this machine{}.\n",
        r.methods.len(),
        total * STANDARD_PROMPTS as f64 / 3600.0,
        if k == STANDARD_SAMPLES {
            ""
        } else {
            " (this run's k differs from 25, so the batch shape and the rate differ)"
        }
    ));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Expected maximum toxicity (y) against pooled perplexity (x). Points whose perplexity is
/// not known are left out (and listed under the plot).
pub fn svg(r: &Report) -> String {
    let (w, h) = (720.0, 480.0);
    let (l, rt, t, b) = (70.0, 30.0, 40.0, 60.0);
    let pts: Vec<(&MethodSummary, f64, f64)> = r
        .methods
        .iter()
        .filter(|m| m.perplexity_pooled.is_finite() && m.expected_max_toxicity.is_finite())
        .map(|m| (m, m.perplexity_pooled, m.expected_max_toxicity))
        .collect();
    let missing: Vec<&str> = r
        .methods
        .iter()
        .filter(|m| !pts.iter().any(|(p, _, _)| p.method == m.method))
        .map(|m| m.method.as_str())
        .collect();
    // perplexity on a log axis: fused rows can be many times the base's
    let lx: Vec<f64> = pts.iter().map(|p| p.1.max(1.0).ln()).collect();
    let (lo, hi) = (
        lx.iter().copied().fold(f64::INFINITY, f64::min),
        lx.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(0.1);
    let (xmin, xmax) = (lo - pad, hi + pad);
    let sx = |x: f64| l + (x.max(1.0).ln() - xmin) / (xmax - xmin) * (w - l - rt);
    let ymax = (pts.iter().map(|p| p.2).fold(0.0, f64::max) * 1.1).clamp(0.1, 1.0);
    let sy = |y: f64| h - b - y / ymax * (h - t - b);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{cx}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        cx = w / 2.0,
        title = esc(&format!(
            "toxicity vs perplexity ({}, {} prompts × {} samples)",
            r.profile, r.config["prompts"]["count"], r.config["samples"]
        )),
    );
    // axes and ticks
    s.push_str(&format!(
        "<line x1=\"{l}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>\n<line x1=\"{l}\" y1=\"{t}\" x2=\"{l}\" y2=\"{y0}\" stroke=\"black\"/>\n",
        y0 = h - b,
        x1 = w - rt
    ));
    for i in 0..=5 {
        let y = ymax * i as f64 / 5.0;
        s.push_str(&format!(
            "<line x1=\"{a}\" y1=\"{py}\" x2=\"{l}\" y2=\"{py}\" stroke=\"black\"/><text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{y:.2}</text>\n",
            a = l - 5.0,
            py = sy(y),
            tx = l - 8.0,
            ty = sy(y) + 4.0
        ));
        let x = (xmin + (xmax - xmin) * i as f64 / 5.0).exp();
        s.push_str(&format!(
            "<line x1=\"{px}\" y1=\"{y0}\" x2=\"{px}\" y2=\"{y1}\" stroke=\"black\"/><text x=\"{px}\" y=\"{ty}\" text-anchor=\"middle\">{x:.0}</text>\n",
            px = sx(x),
            y0 = h - b,
            y1 = h - b + 5.0,
            ty = h - b + 18.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{cx}\" y=\"{y}\" text-anchor=\"middle\">perplexity under the evaluator LM (exp mean NLL, log scale) → less fluent</text>\n\
         <text transform=\"translate(18 {cy}) rotate(-90)\" text-anchor=\"middle\">expected maximum toxicity ↓</text>\n",
        cx = (l + w - rt) / 2.0,
        y = h - 20.0,
        cy = (t + h - b) / 2.0
    ));
    // the fused alphas as a curve, in alpha order
    for (prefix, color) in [("fused-a", "#1f77b4"), ("fused-norm-a", "#9467bd")] {
        let mut curve: Vec<&(&MethodSummary, f64, f64)> = pts
            .iter()
            .filter(|p| p.0.method == "base" || p.0.method.starts_with(prefix))
            .collect();
        curve.sort_by(|a, b| a.0.method.cmp(&b.0.method));
        if curve.len() > 1 {
            let d: Vec<String> = curve
                .iter()
                .map(|p| format!("{:.1},{:.1}", sx(p.1), sy(p.2)))
                .collect();
            s.push_str(&format!(
                "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-dasharray=\"4 3\"/>\n",
                d.join(" ")
            ));
        }
    }
    for (m, x, y) in &pts {
        let color = match m.method.as_str() {
            "base" => "#444444",
            n if n.starts_with("fused-norm") => "#9467bd",
            n if n.starts_with("fused") => "#1f77b4",
            n if n.starts_with("wordfilter") => "#d62728",
            _ => "#2ca02c",
        };
        s.push_str(&format!(
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"5\" fill=\"{color}\"/><text x=\"{tx:.1}\" y=\"{ty:.1}\">{name}</text>\n",
            px = sx(*x),
            py = sy(*y),
            tx = sx(*x) + 8.0,
            ty = sy(*y) - 6.0,
            name = esc(&m.method)
        ));
    }
    if !missing.is_empty() {
        s.push_str(&format!(
            "<text x=\"{l}\" y=\"{y}\">no perplexity yet: {}</text>\n",
            esc(&missing.join(", ")),
            y = h - 4.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, emt: f64, ppl: f64) -> MethodSummary {
        MethodSummary {
            method: method.into(),
            prompts: 2,
            failed_prompts: 0,
            samples: 4,
            expected_max_toxicity: emt,
            toxicity_probability: 0.5,
            mean_toxicity: 0.2,
            perplexity_mean: ppl,
            perplexity_pooled: ppl,
            perplexity_samples: 4,
            distinct_1: 0.5,
            distinct_2: 0.6,
            distinct_3: 0.7,
            generated_tokens: 40,
            generation_seconds: 2.0,
            perplexity_seconds: 1.0,
            second_judge: (method == "base").then(|| crate::eval::harness::JudgeSummary {
                judge: "j2".into(),
                expected_max_toxicity: 0.55,
                toxicity_probability: 0.45,
                mean_toxicity: 0.1,
            }),
        }
    }

    #[test]
    fn table_and_plot_carry_every_method() {
        let r = Report {
            profile: "quick".into(),
            created: "2026-11-28T00:00:00Z".into(),
            commit: "abc".into(),
            command: "detoxfuse eval --quick".into(),
            config: serde_json::json!({"prompts": {"path": "p.jsonl", "count": 2}, "samples": 2}),
            methods: vec![
                row("base", 0.6, 20.0),
                row("fused-a0.2", 0.4, 25.0),
                row("wordfilter", 0.3, f64::NAN),
            ],
        };
        let md = markdown(&r);
        assert!(
            md.contains("| base | 0.600 | 0.500 | 0.200 | 0.550 | 0.450 | 20.0 | 20.0 |"),
            "{md}"
        );
        assert!(
            md.contains("| wordfilter | 0.300 | 0.500 | 0.200 | – | – |"),
            "{md}"
        );
        assert!(
            md.contains("second, independent judge on the same texts (j2:"),
            "{md}"
        );
        assert!(md.contains("| 20.0 |\n"), "tok/s = 40 / 2: {md}");
        // 3 s per 2 prompts -> 1.5 s per prompt -> 1196 * 1.5 / 3600 h
        assert!(md.contains("| base | 2 | 1 | 1.50 | 0.5 h |"), "{md}");
        let svg = svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("no perplexity yet: wordfilter"));
        assert!(svg.contains("<polyline"));
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    utc_from_unix(secs)
}

/// Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
fn utc_from_unix(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn unix_times_render_as_utc_dates() {
        assert_eq!(super::utc_from_unix(0), "1970-01-01T00:00:00Z");
        // 2026-11-28 15:04:43 UTC
        assert_eq!(super::utc_from_unix(1_795_878_283), "2026-11-28T15:04:43Z");
        assert_eq!(super::utc_from_unix(951_782_400), "2000-02-29T00:00:00Z");
    }
}
