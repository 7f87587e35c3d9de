//! YAML configuration text as JSON values, converted by hand: serde's conversion made YAML's
//! `.nan` and `.inf` null (an optional key silently unset) and a tagged value a mapping.
//! References (`${VAR}`) are substituted as the strings are converted, and Nameko's tags
//! `!env_var` and `!raw_env_var` applied.

use serde_json::{Map, Value};
use serde_yaml_ng::value::TaggedValue;
use serde_yaml_ng::{Mapping, Value as Yaml};

use super::substitute::substitute;
use super::ConfigError;

/// How a reference's variable is read (see [`substitute`]); `None` in a value that
/// `!env_var` made, which is not substituted again.
type Lookup<'a> = Option<&'a dyn Fn(&str) -> Result<Option<String>, ConfigError>>;

/// The tags of Nameko's config files, the only ones read.
const TAGS: &str = "the tags read are Nameko's !env_var and !raw_env_var";

/// Parses YAML text into a JSON value, with merge keys (`<<: *base`) applied as PyYAML
/// applies them: files shared with the Python peers use them for per-environment settings.
/// Errors about the whole document name `origin`; references are substituted with `lookup`.
/// The top-level key `left_out`, when given, is left out unread (merged in or not).
pub(super) fn parse(
    text: &str,
    origin: &str,
    lookup: &impl Fn(&str) -> Result<Option<String>, ConfigError>,
    left_out: Option<&str>,
) -> Result<Value, ConfigError> {
    let lookup: Lookup = Some(lookup);
    let refused = |err: serde_yaml_ng::Error| ConfigError::new(origin, "", err.to_string());
    let mut document: Yaml = serde_yaml_ng::from_str(text).map_err(refused)?;
    merge_bottom_up(&mut document, origin)?;
    if let (Some(key), Yaml::Mapping(mapping)) = (left_out, &mut document) {
        mapping.remove(key);
    }
    match document {
        Yaml::Mapping(mapping) => mapping_to_json(mapping, "", lookup).map(Value::Object),
        other => to_json(other, origin, lookup),
    }
}

/// Applies the merge keys of `value` as PyYAML does: a mapping's own keys win over those it
/// merges, an earlier source of `<<: [*a, *b]` over a later one, and a source's own merge
/// keys are applied before it is merged (serde's `apply_merge` copied a source's `<<` in as an
/// ordinary key, so a chain `production <- base` lost what `base` set).
fn merge_bottom_up(value: &mut Yaml, origin: &str) -> Result<(), ConfigError> {
    match value {
        Yaml::Mapping(mapping) => {
            for (_, entry) in mapping.iter_mut() {
                merge_bottom_up(entry, origin)?;
            }
            let Some(merged) = mapping.remove("<<") else { return Ok(()) };
            let sources = match merged {
                Yaml::Mapping(source) => vec![source],
                Yaml::Sequence(items) => items
                    .into_iter()
                    .map(|item| match item {
                        Yaml::Mapping(source) => Ok(source),
                        _ => Err(()),
                    })
                    .collect::<Result<_, _>>()
                    .map_err(|()| not_a_merge_source(origin))?,
                _ => return Err(not_a_merge_source(origin)),
            };
            for (name, entry) in sources.into_iter().flatten() {
                if !mapping.contains_key(&name) {
                    mapping.insert(name, entry);
                }
            }
        }
        Yaml::Sequence(items) => {
            for item in items {
                merge_bottom_up(item, origin)?;
            }
        }
        Yaml::Tagged(tagged) => merge_bottom_up(&mut tagged.value, origin)?,
        Yaml::Null | Yaml::Bool(_) | Yaml::Number(_) | Yaml::String(_) => {}
    }
    Ok(())
}

fn not_a_merge_source(origin: &str) -> ConfigError {
    ConfigError::new(origin, "", "a merge key (<<) takes a mapping or a list of mappings")
}

/// `value`, found under `key`, as JSON. A non-finite float becomes its text (`inf`, `NaN`), as
/// from TOML, so that validation refuses it naming the value.
fn to_json(value: Yaml, key: &str, lookup: Lookup) -> Result<Value, ConfigError> {
    Ok(match value {
        Yaml::Null => Value::Null,
        Yaml::Bool(flag) => Value::Bool(flag),
        Yaml::Number(number) => number_to_json(&number),
        Yaml::String(text) => match lookup {
            Some(lookup) => Value::String(substitute(&text, key, &lookup)?),
            None => Value::String(text),
        },
        Yaml::Sequence(items) => {
            let items = items.into_iter().map(|item| to_json(item, key, lookup));
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        Yaml::Mapping(mapping) => Value::Object(mapping_to_json(mapping, key, lookup)?),
        Yaml::Tagged(tagged) => return tagged_to_json(*tagged, key, lookup),
    })
}

/// A tagged value: Nameko's `!env_var "..."` substitutes, then reads the result as YAML (so
/// `"${WORKERS:4}"` is the integer 4), and `!raw_env_var` substitutes and keeps a string.
/// As in Nameko, a text with no reference is kept as it is.
fn tagged_to_json(tagged: TaggedValue, key: &str, lookup: Lookup) -> Result<Value, ConfigError> {
    let raw = tagged.tag == "raw_env_var";
    let (Some(lookup), true) = (lookup, raw || tagged.tag == "env_var") else {
        // the parser keeps the non-specific tag `!` as `!` and prints it `!!`, which reads
        // as YAML's core tags (`!!int`, `!!str`), read here
        let reason = if tagged.tag == "!" {
            format!(
                "the non-specific YAML tag ! is not supported (YAML 1.2 reads `! 5` as text, \
                 PyYAML as the number): remove it, or quote the value for text; {TAGS}"
            )
        } else {
            format!("YAML tag {} is not supported: {TAGS}", tagged.tag)
        };
        return Err(ConfigError::new(key, "", reason));
    };
    let text = match tagged.value {
        Yaml::String(text) => text,
        Yaml::Number(number) => number.to_string(),
        Yaml::Bool(flag) => flag.to_string(),
        Yaml::Null => String::new(),
        Yaml::Sequence(_) | Yaml::Mapping(_) | Yaml::Tagged(_) => {
            let reason = format!("{} takes a string (with ${{VAR}} references)", tagged.tag);
            return Err(ConfigError::new(key, "", reason));
        }
    };
    let value = substitute(&text, key, &lookup)?;
    if raw || value == text {
        return Ok(Value::String(value));
    }
    let parsed = serde_yaml_ng::from_str(&value).map_err(|err| {
        let reason = format!("{}: the substituted value does not read as YAML: {err}", tagged.tag);
        ConfigError::new(key, "", reason)
    })?;
    to_json(parsed, key, None)
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
fn mapping_to_json(
    mapping: Mapping,
    parent: &str,
    lookup: Lookup,
) -> Result<Map<String, Value>, ConfigError> {
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
        object.insert(name, to_json(value, &key, lookup)?);
    }
    Ok(object)
}
