//! How `AMQP_URI` holds several broker nodes: one URI or a comma-separated list.

use url::Url;

/// The entries of an `AMQP_URI` value, in order, each without surrounding whitespace.
///
/// Commas separate entries, except inside the user name or password of a value that is one
/// valid URI (`amqp://u:pa,ss@h/`): such a value was always one broker, and stays one. In a
/// list, write such a comma as `%2C`.
pub(crate) fn entries(raw: &str) -> Vec<&str> {
    let one_uri_with_comma_in_userinfo = Url::parse(raw.trim()).is_ok_and(|url| {
        let comma = url.username().contains(',') || url.password().is_some_and(|p| p.contains(','));
        comma && !url.path().contains("://")
    });
    if one_uri_with_comma_in_userinfo {
        return vec![raw.trim()];
    }
    raw.split(',').map(str::trim).collect()
}

#[cfg(test)]
mod tests {
    use super::entries;

    #[test]
    fn entries_are_split_on_commas_and_trimmed() {
        assert_eq!(entries("amqp://h/"), ["amqp://h/"]);
        assert_eq!(
            entries(" amqp://a/ ,amqp://b/,  amqp://c/"),
            ["amqp://a/", "amqp://b/", "amqp://c/"]
        );
        assert_eq!(entries("amqp://a/,,amqp://b/,"), ["amqp://a/", "", "amqp://b/", ""]);
        assert_eq!(entries(""), [""]);
    }

    #[test]
    fn a_comma_in_the_password_of_one_uri_is_not_a_separator() {
        assert_eq!(entries("amqp://u:pa,ss@h/"), ["amqp://u:pa,ss@h/"]);
        assert_eq!(entries("amqp://u,v:p@h/"), ["amqp://u,v:p@h/"]);
        // In a list, such a comma separates: the entry left without `scheme://` is refused.
        assert_eq!(entries("amqp://u:pa,ss@a/,amqp://u:pa,ss@b/").len(), 4);
        assert_eq!(entries("amqp://h/,localhost").len(), 2);
    }
}
