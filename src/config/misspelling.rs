//! Whether a key the framework does not read is a misspelling of one it does: alike enough
//! to it, and either very close or the same words but one (so that another program's
//! variable, `METRICS_PATH`, is not taken for one).

/// How alike a file's key must be to a framework key to be named its misspelling.
pub(super) const FILE_SIMILARITY: f64 = 0.75;

/// The same for an environment variable: higher, as the environment holds the variables of
/// other software too (`METRICS_PATH`, `NIX_SSL_CERT_FILE` are no misspellings).
pub(super) const ENV_SIMILARITY: f64 = 0.8;

/// Keys this alike are a misspelling whatever their words (`RPC_TIMOUT`), as are those with
/// a framework key's letters but one, whatever their separators (`AMQPURI`, `AMQP-URI`).
const CLOSE_SIMILARITY: f64 = 0.9;

/// Otherwise a misspelling has a framework key's words but one, and that one alike
/// (`AMQP_URL`, `MAX_WORKER`): `API_TIMEOUT`, `METRICS_PATH` or `RPC_TIMEOUT_MS` are keys of
/// their own, not misspellings of `RPC_TIMEOUT`, `METRICS_PORT`.
const WORD_SIMILARITY: f64 = 0.6;

/// The key of `known` closest to `key` (compared in upper case), when their similarity is at
/// least `similarity` and `key` looks like a misspelling of it ([`misspelt`]); never `key`
/// itself.
pub(super) fn closest(
    key: &str,
    similarity: f64,
    known: impl Iterator<Item = &'static str>,
) -> Option<&'static str> {
    let upper = key.to_uppercase();
    known
        .filter(|name| *name != key)
        .map(|name| (strsim::normalized_damerau_levenshtein(&upper, name), name))
        .filter(|(alike, name)| *alike >= similarity && misspelt(&upper, name, *alike))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| name)
}

/// Whether `key` (upper case), `alike` to the framework's key `name`, is a misspelling of
/// it: very close, or the same words but one that is close.
fn misspelt(key: &str, name: &str, alike: f64) -> bool {
    let squashed = |key: &str| key.replace(['_', '-'], "");
    if alike >= CLOSE_SIMILARITY
        || strsim::damerau_levenshtein(&squashed(key), &squashed(name)) <= 1
    {
        return true;
    }
    let words = |key: &str| key.split(['_', '-']).map(str::to_owned).collect::<Vec<_>>();
    let (words, known) = (words(key), words(name));
    if words.len() != known.len() {
        return false;
    }
    let mut differing = words.iter().zip(&known).filter(|(word, known)| word != known);
    match (differing.next(), differing.next()) {
        (Some((word, known)), None) => {
            strsim::normalized_damerau_levenshtein(word, known) >= WORD_SIMILARITY
        }
        _ => false,
    }
}
