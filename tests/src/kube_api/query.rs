//! The query string of a request, decoded as Go's `url.ParseQuery` does
//! (`+` is a space, `%XX` a byte); the first value of a key wins, as
//! `url.Values.Get` returns it.

#[derive(Debug, Default)]
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: &str) -> Query {
        Query(
            raw.split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(key), decode(value))
                })
                .collect(),
        )
    }

    /// The value of `key`, if present (possibly empty).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of `key`, treating an empty value as absent.
    pub fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    /// A boolean flag as the API reads it (`strconv.ParseBool`): true for
    /// "1", "t", "T", "TRUE", "true", "True".
    pub fn flag(&self, key: &str) -> bool {
        matches!(
            self.get(key),
            Some("1" | "t" | "T" | "TRUE" | "true" | "True")
        )
    }
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: Option<&u8>) -> Option<u8> {
    let b = *b?;
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_as_go_does() {
        let q = Query::parse(
            "labelSelector=%21service.kubernetes.io%2Fheadless&limit=2&watch=1&empty=&x=a+b&bad=%zz&x=second",
        );
        assert_eq!(
            q.get("labelSelector"),
            Some("!service.kubernetes.io/headless")
        );
        assert_eq!(q.get("limit"), Some("2"));
        assert!(q.flag("watch"));
        assert!(!q.flag("limit"));
        assert_eq!(q.get("empty"), Some(""));
        assert_eq!(q.non_empty("empty"), None);
        assert_eq!(q.get("x"), Some("a b"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(Query::parse("a=%4").get("a"), Some("%4"));
    }
}
