//! Dense FP16/BF16 tensor TFLOPS of known GPU models, which turn a worker's TFLOPS into a share
//! of its GPU. NVML reports a model name (`NVIDIA H100 80GB HBM3`); the longest table key found
//! in it wins, so `H100 PCIe` beats `H100`. Entries in the configuration (`gpuTflops`) win over
//! the built-in table.

use std::collections::BTreeMap;

/// Built-in table: (name fragment, TFLOPS). Dense tensor throughput without sparsity, from the
/// vendors' data sheets.
const KNOWN_MODELS: &[(&str, f64)] = &[
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L20", 119.5),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("A30", 165.0),
    ("T4", 65.0),
    ("V100", 125.0),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
];

/// TFLOPS of `model`: the configured entries first, then the built-in table, by the longest
/// name fragment contained in the model name (case-insensitive). `None` for an unknown model.
pub fn tflops_of(model: &str, overrides: &BTreeMap<String, f64>) -> Option<f64> {
    let model = model.to_ascii_lowercase();
    let best = |entries: &mut dyn Iterator<Item = (&str, f64)>| {
        entries
            .filter(|(fragment, _)| model.contains(&fragment.to_ascii_lowercase()))
            .max_by_key(|(fragment, _)| fragment.len())
            .map(|(_, tflops)| tflops)
    };
    best(
        &mut overrides
            .iter()
            .map(|(name, tflops)| (name.as_str(), *tflops)),
    )
    .or_else(|| best(&mut KNOWN_MODELS.iter().copied()))
}

/// A label value for the model: `NVIDIA H100 80GB HBM3` becomes `NVIDIA-H100-80GB-HBM3`.
pub fn model_label(model: &str) -> String {
    let mut label: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    label.truncate(63);
    label
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_models_and_longest_match() {
        let none = BTreeMap::new();
        assert_eq!(tflops_of("NVIDIA H100 80GB HBM3", &none), Some(989.0));
        assert_eq!(tflops_of("NVIDIA H100 PCIe", &none), Some(756.0));
        assert_eq!(tflops_of("NVIDIA H200", &none), Some(989.0));
        assert_eq!(tflops_of("NVIDIA A100-SXM4-80GB", &none), Some(312.0));
        assert_eq!(tflops_of("NVIDIA L40S", &none), Some(362.0));
        assert_eq!(tflops_of("NVIDIA L4", &none), Some(121.0));
        assert_eq!(tflops_of("NVIDIA A10", &none), Some(125.0));
        assert_eq!(tflops_of("Tesla T4", &none), Some(65.0));
        assert_eq!(tflops_of("NVIDIA GeForce RTX 4090", &none), Some(165.2));
        assert_eq!(tflops_of("Some Future GPU", &none), None);
    }

    #[test]
    fn configuration_wins() {
        let overrides = BTreeMap::from([("H100".to_owned(), 500.0)]);
        assert_eq!(tflops_of("NVIDIA H100 80GB HBM3", &overrides), Some(500.0));
        assert_eq!(tflops_of("NVIDIA L4", &overrides), Some(121.0));
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(
            model_label("NVIDIA H100 80GB HBM3"),
            "NVIDIA-H100-80GB-HBM3"
        );
        assert_eq!(model_label(" (weird) "), "weird");
    }
}
