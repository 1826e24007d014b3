//! Scraping over real HTTP: a plain HTTP/1.1 GET and a parser of the
//! Prometheus text format, for tests of the metrics endpoint.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample of the text format: name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// A plain HTTP/1.1 GET; returns status, content type and body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => panic!("cannot connect to {addr}: {e}"),
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if let Err(e) = stream.write_all(req.as_bytes()).await {
        panic!("cannot send the request: {e}");
    }
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw).await {
        panic!("cannot read the answer: {e}");
    }
    let raw = match String::from_utf8(raw) {
        Ok(s) => s,
        Err(e) => panic!("answer is not UTF-8: {e}"),
    };
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        panic!("answer without a blank line after the head: {raw:?}");
    };
    let Some(status) = head.split(' ').nth(1).and_then(|s| s.parse().ok()) else {
        panic!("no status in {head:?}");
    };
    let content_type = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, content_type, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = body.split_once("\r\n") else {
            panic!("chunk without a size line: {body:?}");
        };
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            panic!("chunk size is not hex: {size:?}");
        };
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// The samples of a text-format page (`name{labels} value` lines).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let Some((series, value)) = line.rsplit_once(' ') else {
            panic!("sample without a value: {line:?}");
        };
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse() {
                Ok(v) => v,
                Err(e) => panic!("value {v:?} of {line:?} is not a number: {e}"),
            },
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let Some(rest) = rest.strip_suffix('}') else {
                    panic!("labels without a closing brace: {line:?}");
                };
                (name.to_owned(), parse_labels(rest))
            }
        };
        out.push((name, labels, value));
    }
    out
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert_eq!(chars.next(), Some('"'), "label {key} without a quote");
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => val.push('\n'),
                    Some(c) => val.push(c),
                    None => panic!("dangling escape in {text:?}"),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        if chars.peek() == Some(&',') {
            chars.next();
        }
        labels.insert(key, val);
    }
    labels
}

/// The value of the one sample of `name` with exactly `labels`, if any
/// (panics if there are several).
pub fn find(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let found: Vec<f64> = samples
        .iter()
        .filter(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| *v)
        .collect();
    assert!(
        found.len() <= 1,
        "{name} {labels:?} appears twice: {found:?}"
    );
    found.first().copied()
}

/// The value of the one sample of `name` with exactly `labels`; panics if
/// there is none.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(samples, name, labels) {
        Some(v) => v,
        None => panic!("no sample {name} {labels:?}"),
    }
}
