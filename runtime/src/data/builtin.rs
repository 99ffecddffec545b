//! Built-in synthetic data sets with a known right answer, for tests, the eval gate and demos.
//!
//! `builtin:arith` is integer arithmetic: prompt `"12+7="`, response `"19"`. Parameters
//! (`builtin:arith?digits=2&ops=+-`): `digits` 1..=3 (operands below 10^digits, default 2) and
//! `ops` among `+`, `-`, `*` (default `+`). Every operand pair is enumerated once per op.

use super::{DataError, Example};

/// The examples of a built-in data set.
pub fn load(spec: &str) -> Result<Vec<Example>, DataError> {
    let (name, query) = spec.split_once('?').unwrap_or((spec, ""));
    match name {
        "arith" => arith(query),
        other => Err(DataError::Builtin(format!(
            "{other:?} does not exist (available: arith)"
        ))),
    }
}

fn arith(query: &str) -> Result<Vec<Example>, DataError> {
    let mut digits = 2u32;
    let mut ops = "+".to_string();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let bad = || DataError::Builtin(format!("arith: bad parameter {kv:?}"));
        match kv.split_once('=').ok_or_else(bad)? {
            ("digits", v) => {
                digits = v
                    .parse()
                    .ok()
                    .filter(|d| (1..=3).contains(d))
                    .ok_or_else(bad)?
            }
            ("ops", v) if !v.is_empty() && v.chars().all(|c| "+-*".contains(c)) => ops = v.into(),
            _ => return Err(bad()),
        }
    }
    let n = 10i64.pow(digits);
    let mut out = Vec::new();
    for op in ops.chars() {
        for a in 0..n {
            for b in 0..n {
                let r = match op {
                    '+' => a + b,
                    '-' => a - b,
                    _ => a * b,
                };
                out.push(Example::Pair {
                    prompt: format!("{a}{op}{b}="),
                    response: r.to_string(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arith_answers_are_right() {
        let ex = load("arith?digits=1&ops=+*").unwrap();
        assert_eq!(ex.len(), 200);
        assert!(ex.contains(&Example::Pair {
            prompt: "7*8=".into(),
            response: "56".into()
        }));
        assert!(load("arith?digits=9").is_err());
        assert!(load("nope").is_err());
    }
}
