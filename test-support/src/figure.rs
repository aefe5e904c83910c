//! One benchmark figure as `bench/run` collects it: each bench prints its human lines
//! and, per figure, one `RESULT {json}` line with the samples' min/median/max, the
//! baseline measured in the same run, the goal from DESIGN §8 and whether it is met.

pub fn median(samples: &[f64]) -> f64 {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[derive(Debug, Default)]
pub struct Figure<'a> {
    pub figure: &'a str,
    pub unit: &'a str,
    pub samples: &'a [f64],
    /// What the figure is compared to, measured in the same run.
    pub baseline_name: &'a str,
    pub baseline: &'a [f64],
    /// The name of another figure of the same run to use as the baseline (bench/run
    /// fills it in), when the baseline is measured by another bench.
    pub baseline_from: &'a str,
    pub goal: &'a str,
    /// `None` when the figure has no goal of its own.
    pub met: Option<bool>,
    /// What limits the figure (said when the goal is not met).
    pub note: &'a str,
}

impl Figure<'_> {
    pub fn emit(&self) {
        let value = median(self.samples);
        let stats = |v: &[f64]| {
            (
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        let (min, max) = stats(self.samples);
        let baseline = (!self.baseline.is_empty()).then(|| median(self.baseline));
        let result = serde_json::json!({
            "figure": self.figure,
            "value": value,
            "unit": self.unit,
            "repetitions": self.samples.len(),
            "min": min,
            "median": value,
            "max": max,
            "baseline": baseline,
            "baseline_name": self.baseline_name,
            "baseline_from": (!self.baseline_from.is_empty()).then_some(self.baseline_from),
            "baseline_repetitions": self.baseline.len(),
            "ratio": baseline.map(|b| value / b),
            "goal": self.goal,
            "met": self.met,
            "note": self.note,
        });
        println!("RESULT {result}");
    }
}
