//! Command-line parsing (pure logic, `core` only; also compiled host-side for unit tests).
//!
//! Grammar (PROTOCOL.md): whitespace-separated tokens, Linux style, where a token may double-quote a value
//! (`key="a b"`). Tokens before the first bare word are kernel-style `key=value` parameters (`earlycon=...`);
//! the first bare word names the workload; every token after it is a `key=value` parameter of the workload.

/// One token: `key=value` (value unquoted) or a bare word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token<'a> {
    KeyValue(&'a str, &'a str),
    Word(&'a str),
}

/// Splits a command line into tokens.
#[derive(Clone, Debug)]
pub struct Tokens<'a> {
    rest: &'a str,
}

pub fn tokens(cmdline: &str) -> Tokens<'_> {
    Tokens { rest: cmdline }
}

fn strip_quotes(value: &str) -> &str {
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let s = self
            .rest
            .trim_start_matches(|c: char| c.is_ascii_whitespace());
        if s.is_empty() {
            self.rest = s;
            return None;
        }
        let mut in_quotes = false;
        let mut end = s.len();
        for (i, c) in s.char_indices() {
            if c == '"' {
                in_quotes = !in_quotes;
            } else if c.is_ascii_whitespace() && !in_quotes {
                end = i;
                break;
            }
        }
        let token = &s[..end];
        self.rest = &s[end..];
        Some(match token.split_once('=') {
            Some((key, value)) => Token::KeyValue(key, strip_quotes(value)),
            None => Token::Word(strip_quotes(token)),
        })
    }
}

/// Value of the first kernel-style parameter `key` (before the workload name), if any.
pub fn kernel_param<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    for token in tokens(cmdline) {
        match token {
            Token::KeyValue(k, v) if k == key => return Some(v),
            Token::Word(_) => return None,
            Token::KeyValue(..) => {}
        }
    }
    None
}

/// The workload named on the command line and the tokens that follow it.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    pub name: &'a str,
    pub params: Tokens<'a>,
}

/// The first bare word and what follows it; `None` if the command line names no workload.
pub fn workload(cmdline: &str) -> Option<Workload<'_>> {
    let mut it = tokens(cmdline);
    while let Some(token) = it.next() {
        if let Token::Word(name) = token {
            return Some(Workload { name, params: it });
        }
    }
    None
}

/// Why a workload's parameters were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamError<'a> {
    /// A key the workload does not know.
    Unknown(&'a str),
    /// A bare word after the workload name.
    Stray(&'a str),
    /// A value that is not a number.
    NotANumber(&'a str, &'a str),
}

impl core::fmt::Display for ParamError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParamError::Unknown(k) => write!(f, "unknown parameter '{k}'"),
            ParamError::Stray(w) => write!(f, "unexpected word '{w}' (parameters are key=value)"),
            ParamError::NotANumber(k, v) => write!(f, "parameter {k}={v} is not a number"),
        }
    }
}

/// Checks that every parameter is `key=value` with a key in `allowed`.
pub fn check_params<'a>(params: Tokens<'a>, allowed: &[&str]) -> Result<(), ParamError<'a>> {
    for token in params {
        match token {
            Token::Word(w) => return Err(ParamError::Stray(w)),
            Token::KeyValue(k, _) if !allowed.contains(&k) => return Err(ParamError::Unknown(k)),
            Token::KeyValue(..) => {}
        }
    }
    Ok(())
}

/// The last value given for `key` among the parameters, parsed as a number; `default` if absent.
pub fn param_u64<'a>(
    params: Tokens<'a>,
    key: &'a str,
    default: u64,
) -> Result<u64, ParamError<'a>> {
    let mut result = default;
    for token in params {
        if let Token::KeyValue(k, v) = token {
            if k == key {
                result = parse_u64(v).ok_or(ParamError::NotANumber(k, v))?;
            }
        }
    }
    Ok(result)
}

/// Decimal or `0x` hexadecimal; `_` separators allowed.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let d = c.to_digit(radix)?;
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(d))?;
        any = true;
    }
    any.then_some(value)
}

/// Where the early console is, from an `earlycon=` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Earlycon {
    /// 16550 with registers `stride` bytes apart at a physical address (`mmio`: 1, `mmio32`: 4).
    Mmio { addr: u64, stride: u8 },
    /// 16550 on I/O ports.
    Io { port: u16 },
}

/// Parses `uart8250,mmio,0xADDR[,options]` (also `uart,`, `mmio32`, `io`); `None` for anything else.
pub fn parse_earlycon(value: &str) -> Option<Earlycon> {
    let mut parts = value.split(',');
    let driver = parts.next()?;
    if driver != "uart8250" && driver != "uart" {
        return None;
    }
    let space = parts.next()?;
    let addr = parse_u64(parts.next()?)?;
    match space {
        "mmio" => Some(Earlycon::Mmio { addr, stride: 1 }),
        "mmio32" => Some(Earlycon::Mmio { addr, stride: 4 }),
        "io" => u16::try_from(addr).ok().map(|port| Earlycon::Io { port }),
        _ => None,
    }
}
