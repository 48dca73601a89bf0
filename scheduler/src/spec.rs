//! Job specs as researchers write them: YAML (or JSON, a subset of YAML), checked field by
//! field before anything is sent.

use suanli_types::{DomainError, FieldError, JobSpec};

/// Parses and validates a spec; every problem is listed, each with its field.
///
/// The YAML is read as a plain document first and then mapped like JSON, so both spell the
/// run's variant the same way (`run: {command: {...}}`) rather than as a YAML tag.
pub fn parse(text: &str) -> Result<JobSpec, DomainError> {
    let document: serde_json::Value = serde_yaml::from_str(text).map_err(|e| DomainError::Invalid(vec![FieldError::new("spec", e.to_string())]))?;
    let spec: JobSpec = serde_json::from_value(document).map_err(|e| DomainError::Invalid(vec![FieldError::new("spec", e.to_string())]))?;
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: resnet18-cifar
kind: training
resources:
  cards: 2
  gpu_models: [A100, L40S]
  min_vram_mib: 40000
  single_node: true
run:
  command:
    program: /usr/bin/python3
    args: [train.py, --epochs, "10"]
preemptible: true
expected_seconds: 3600
"#;

    #[test]
    fn yaml_and_json_give_the_same_spec() {
        let yaml = parse(GOOD).expect("valid");
        let json = parse(&serde_json::to_string(&yaml).expect("json")).expect("valid json");
        assert_eq!(yaml, json);
        assert_eq!(yaml.resources.cards, 2);
        assert_eq!(yaml.max_attempts, 3, "the default");
    }

    #[test]
    fn typos_and_bad_values_are_reported_by_field() {
        let typo = parse(&GOOD.replace("preemptible", "preemtible")).unwrap_err();
        assert!(typo.to_string().contains("preemtible"), "{typo}");
        let bad = parse(&GOOD.replace("cards: 2", "cards: 0").replace("name: resnet18-cifar", "name: \"\"")).unwrap_err();
        let fields: Vec<&str> = bad.field_errors().iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"resources.cards") && fields.contains(&"name"), "{fields:?}");
    }
}
