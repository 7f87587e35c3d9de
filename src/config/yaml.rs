//! YAML configuration text as JSON values, converted by hand: serde's conversion made YAML's
//! `.nan` and `.inf` null (an optional key silently unset) and a tagged value a mapping.

use serde_json::{Map, Value};
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::ConfigError;

/// Parses YAML text into a JSON value, with merge keys (`<<: *base`) applied as PyYAML
/// applies them: files shared with the Python peers use them for per-environment settings.
/// Errors about the whole document name `origin`.
pub(super) fn parse(text: &str, origin: &str) -> Result<Value, ConfigError> {
    let refused = |err: serde_yaml_ng::Error| ConfigError::new(origin, "", err.to_string());
    let mut document: Yaml = serde_yaml_ng::from_str(text).map_err(refused)?;
    document.apply_merge().map_err(refused)?;
    match document {
        Yaml::Mapping(mapping) => mapping_to_json(mapping, "").map(Value::Object),
        other => to_json(other, origin),
    }
}

/// `value`, found under `key`, as JSON. A non-finite float becomes its text (`inf`, `NaN`), as
/// from TOML, so that validation refuses it naming the value.
fn to_json(value: Yaml, key: &str) -> Result<Value, ConfigError> {
    Ok(match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(flag) => Value::Bool(flag),
        Yaml::Number(number) => number_to_json(&number),
        Yaml::String(text) => Value::String(text),
        Yaml::Sequence(items) => {
            let items = items.into_iter().map(|item| to_json(item, key));
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => Value::Object(mapping_to_json(mapping, key)?),
        Yaml::Tagged(tagged) => {
            let reason = format!("YAML tag {} is not supported", tagged.tag);
            return Err(ConfigError::new(key, "", reason));
        }
    })
}

/// A YAML number as JSON: an integer as is, a float when finite, else its text.
fn number_to_json(number: &serde_yaml_ng::Number) -> Value {
    if let Some(unsigned) = number.as_u64() {
        return Value::from(unsigned);
    }
    if let Some(signed) = number.as_i64() {
        return Value::from(signed);
    }
    let float = number.as_f64();
    float.and_then(serde_json::Number::from_f64).map_or_else(
        || Value::String(float.map_or_else(|| number.to_string(), |f| f.to_string())),
        Value::Number,
    )
}

/// A mapping found under `parent` (empty at the top level) as a JSON object; its entries are
/// named `PARENT.NAME` in errors.
fn mapping_to_json(mapping: Mapping, parent: &str) -> Result<Map<String, Value>, ConfigError> {
    let mut object = Map::new();
    for (name, value) in mapping {
        let name = match name {
            Yaml::String(text) => text,
            Yaml::Number(number) => number.to_string(),
            Yaml::Bool(flag) => flag.to_string(),
            _ => {
                let reason = "a mapping key must be a string, a number or a boolean";
                return Err(ConfigError::new(parent, "", reason));
            }
        };
        let key = if parent.is_empty() { name.clone() } else { format!("{parent}.{name}") };
        object.insert(name, to_json(value, &key)?);
    }
    Ok(object)
}
