//! Label and field selectors, with the grammar the API server accepts
//! (k8s.io/apimachinery labels.Parse and fields.ParseSelector).

use std::collections::BTreeMap;

use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub(crate) enum SelectorError {
    #[error("unable to parse label selector {selector:?}: {why} at offset {at}")]
    Label {
        selector: String,
        why: &'static str,
        at: usize,
    },
    #[error("invalid field selector {selector:?}: term {term:?} needs an operator (=, == or !=)")]
    FieldTerm { selector: String, term: String },
    // The real server's wording, which clients match on.
    #[error("field label not supported: {0}")]
    FieldLabel(String),
}

/// One requirement of a label selector.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Exists(String),
    DoesNotExist(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    GreaterThan(String, i64),
    LessThan(String, i64),
}

/// A parsed `labelSelector`: all requirements must hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

impl LabelSelector {
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let tokens = lex(selector)?;
        Parser {
            selector,
            tokens,
            next: 0,
        }
        .selector()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            // As in Kubernetes, a missing key satisfies != and notin.
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::GreaterThan(k, n) => number(labels.get(k)).is_some_and(|l| l > *n),
            Requirement::LessThan(k, n) => number(labels.get(k)).is_some_and(|l| l < *n),
        })
    }
}

fn number(value: Option<&String>) -> Option<i64> {
    value?.parse().ok()
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Not,
    Equals,
    DoubleEquals,
    NotEquals,
    Greater,
    Less,
    Open,
    Close,
    Comma,
    In,
    NotIn,
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/')
}

/// Tokens with their byte offsets, for error messages.
fn lex(selector: &str) -> Result<Vec<(usize, Token)>, SelectorError> {
    let mut tokens = Vec::new();
    let mut chars = selector.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let token = match c {
            c if c.is_whitespace() => continue,
            ',' => Token::Comma,
            '(' => Token::Open,
            ')' => Token::Close,
            '>' => Token::Greater,
            '<' => Token::Less,
            '!' if chars.next_if(|(_, c)| *c == '=').is_some() => Token::NotEquals,
            '!' => Token::Not,
            '=' if chars.next_if(|(_, c)| *c == '=').is_some() => Token::DoubleEquals,
            '=' => Token::Equals,
            c if is_word_char(c) => {
                let mut end = at + c.len_utf8();
                while let Some((i, c)) = chars.next_if(|(_, c)| is_word_char(*c)) {
                    end = i + c.len_utf8();
                }
                match &selector[at..end] {
                    "in" => Token::In,
                    "notin" => Token::NotIn,
                    word => Token::Word(word.to_owned()),
                }
            }
            _ => {
                return Err(SelectorError::Label {
                    selector: selector.to_owned(),
                    why: "unexpected character",
                    at,
                });
            }
        };
        tokens.push((at, token));
    }
    Ok(tokens)
}

struct Parser<'a> {
    selector: &'a str,
    tokens: Vec<(usize, Token)>,
    next: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next).map(|(_, t)| t)
    }

    fn take(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.next).map(|(_, t)| t.clone());
        self.next += 1;
        token
    }

    fn error(&self, why: &'static str) -> SelectorError {
        let at = self
            .tokens
            .get(self.next.saturating_sub(1))
            .map_or(self.selector.len(), |(at, _)| *at);
        SelectorError::Label {
            selector: self.selector.to_owned(),
            why,
            at,
        }
    }

    fn selector(mut self) -> Result<LabelSelector, SelectorError> {
        let mut requirements = Vec::new();
        if self.tokens.is_empty() {
            return Ok(LabelSelector(requirements));
        }
        loop {
            requirements.push(self.requirement()?);
            match self.take() {
                None => return Ok(LabelSelector(requirements)),
                Some(Token::Comma) => {}
                Some(_) => return Err(self.error("expected ',' between requirements")),
            }
        }
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        match self.take() {
            Some(Token::Word(key)) => Ok(key),
            _ => Err(self.error("expected a label key")),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.peek() == Some(&Token::Not) {
            self.next += 1;
            return Ok(Requirement::DoesNotExist(self.key()?));
        }
        let key = self.key()?;
        match self.peek() {
            None | Some(Token::Comma) => Ok(Requirement::Exists(key)),
            Some(Token::Equals | Token::DoubleEquals) => {
                self.next += 1;
                Ok(Requirement::Equals(key, self.value()))
            }
            Some(Token::NotEquals) => {
                self.next += 1;
                Ok(Requirement::NotEquals(key, self.value()))
            }
            Some(Token::In) => {
                self.next += 1;
                Ok(Requirement::In(key, self.set()?))
            }
            Some(Token::NotIn) => {
                self.next += 1;
                Ok(Requirement::NotIn(key, self.set()?))
            }
            Some(Token::Greater) => {
                self.next += 1;
                Ok(Requirement::GreaterThan(key, self.integer()?))
            }
            Some(Token::Less) => {
                self.next += 1;
                Ok(Requirement::LessThan(key, self.integer()?))
            }
            Some(_) => Err(self.error("expected an operator after the key")),
        }
    }

    /// A value may be empty (`key=`).
    fn value(&mut self) -> String {
        match self.peek() {
            Some(Token::Word(w)) => {
                let w = w.clone();
                self.next += 1;
                w
            }
            _ => String::new(),
        }
    }

    fn integer(&mut self) -> Result<i64, SelectorError> {
        match self.take() {
            Some(Token::Word(w)) => w.parse().map_err(|_| self.error("expected an integer")),
            _ => Err(self.error("expected an integer")),
        }
    }

    /// `(a, b, c)`; empty values allowed, as the real parser allows them.
    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        if self.take() != Some(Token::Open) {
            return Err(self.error("expected '(' to open a set"));
        }
        let mut values = Vec::new();
        loop {
            values.push(self.value());
            match self.take() {
                Some(Token::Comma) => {}
                Some(Token::Close) => return Ok(values),
                _ => return Err(self.error("expected ',' or ')' in a set")),
            }
        }
    }
}

/// One term of a field selector.
#[derive(Debug, Clone, PartialEq)]
struct FieldTerm {
    label: String,
    value: String,
    equal: bool,
}

/// A parsed `fieldSelector`: `label=value`, `label==value`, `label!=value`,
/// comma-joined, with `\` escaping `,`, `=`, `!` and `\` in values.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct FieldSelector(Vec<FieldTerm>);

impl FieldSelector {
    /// Parses `selector`, allowing only the labels in `supported`.
    pub fn parse(selector: &str, supported: &[&str]) -> Result<FieldSelector, SelectorError> {
        let mut terms = Vec::new();
        for term in split_unescaped(selector, ',') {
            if term.trim().is_empty() {
                continue;
            }
            let (label, value, equal) =
                split_term(&term).ok_or_else(|| SelectorError::FieldTerm {
                    selector: selector.to_owned(),
                    term: term.clone(),
                })?;
            let label = label.trim().to_owned();
            if !supported.contains(&label.as_str()) {
                return Err(SelectorError::FieldLabel(label));
            }
            terms.push(FieldTerm {
                label,
                value: unescape(value.trim()),
                equal,
            });
        }
        Ok(FieldSelector(terms))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, fields: &[(&'static str, String)]) -> bool {
        self.0.iter().all(|t| {
            let value = fields
                .iter()
                .find(|(label, _)| *label == t.label)
                .map_or("", |(_, v)| v.as_str());
            (value == t.value) == t.equal
        })
    }
}

/// Splits on `sep` where it is not escaped by a backslash (escapes kept).
fn split_unescaped(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut escaped = false;
    for c in s.chars() {
        let last = parts.last_mut().expect("never empty");
        if escaped {
            last.push(c);
            escaped = false;
        } else if c == '\\' {
            last.push(c);
            escaped = true;
        } else if c == sep {
            parts.push(String::new());
        } else {
            last.push(c);
        }
    }
    parts
}

/// `(label, value, is_equality)` at the first unescaped operator.
fn split_term(term: &str) -> Option<(&str, &str, bool)> {
    let bytes = term.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                return Some((&term[..i], &term[i + 2..], false));
            }
            b'=' if bytes.get(i + 1) == Some(&b'=') => {
                return Some((&term[..i], &term[i + 2..], true));
            }
            b'=' => return Some((&term[..i], &term[i + 1..], true)),
            _ => i += 1,
        }
    }
    None
}

fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn kube_proxy_selector() {
        let s = LabelSelector::parse(
            "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
        )
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("service.kubernetes.io/headless", "")])));
        assert!(!s.matches(&labels(&[(
            "service.kubernetes.io/service-proxy-name",
            "other"
        )])));
    }

    #[test]
    fn label_operators() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("n", "5")]);
        let yes = [
            "",
            "app",
            "app=web",
            "app==web",
            "app!=db",
            "missing!=x",
            "app in (web, db)",
            "app notin (db)",
            "missing notin (db)",
            "n>4",
            "n<6",
            " app = web , tier ",
        ];
        for s in yes {
            assert!(LabelSelector::parse(s).unwrap().matches(&l), "{s:?}");
        }
        let no = [
            "missing",
            "!app",
            "app=db",
            "app!=web",
            "app in (db)",
            "missing in (db)",
            "app notin (web)",
            "n>5",
            "app,missing",
        ];
        for s in no {
            assert!(!LabelSelector::parse(s).unwrap().matches(&l), "{s:?}");
        }
        assert!(
            LabelSelector::parse("app=")
                .unwrap()
                .matches(&labels(&[("app", "")]))
        );
    }

    #[test]
    fn label_syntax_errors() {
        for s in [
            "app in web",
            "app in (web",
            "=web",
            "app web",
            "n>x",
            "a,,b",
            "a$b",
        ] {
            assert!(LabelSelector::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn field_selectors() {
        let supported = ["metadata.name", "spec.nodeName"];
        let fields = vec![
            ("metadata.name", "a,b".to_owned()),
            ("spec.nodeName", "node-a".to_owned()),
        ];
        for s in [
            "spec.nodeName=node-a",
            "spec.nodeName==node-a",
            "spec.nodeName!=node-b",
            "metadata.name=a\\,b,spec.nodeName=node-a",
        ] {
            assert!(
                FieldSelector::parse(s, &supported)
                    .unwrap()
                    .matches(&fields),
                "{s:?}"
            );
        }
        assert!(
            !FieldSelector::parse("spec.nodeName=node-b", &supported)
                .unwrap()
                .matches(&fields)
        );
        assert_eq!(
            FieldSelector::parse("spec.other=x", &supported),
            Err(SelectorError::FieldLabel("spec.other".into()))
        );
        assert!(FieldSelector::parse("spec.nodeName", &supported).is_err());
    }
}
