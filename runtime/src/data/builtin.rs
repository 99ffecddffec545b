//! Built-in synthetic data sets with a known right answer, for tests, the eval gate and demos.
//!
//! `builtin:arith` is integer arithmetic: prompt `"12+7="`, response `"19"`. Parameters
//! (`builtin:arith?digits=2&ops=+-`): `digits` 1..=3 (operands below 10^digits, default 2) and
//! `ops` among `+`, `-`, `*` (default `+`). Every operand pair is enumerated once per op.
//!
//! `builtin:instruct` is the same arithmetic as an instruction a chat model answers in full
//! sentences unless taught: prompt `"What is 7 plus 8? Answer with the number only."`,
//! response `"15"` (default `digits=1`, `ops=+-*`). `builtin:preferences` pairs each of those
//! prompts with the bare number (chosen) and a chatty sentence (rejected,
//! `"The answer is 15."`), or with `rejected=wrong` a wrong number (`16`). Same parameters.

use super::{DataError, Example, Prompt};

/// The examples of a built-in data set.
pub fn load(spec: &str) -> Result<Vec<Example>, DataError> {
    let (name, query) = spec.split_once('?').unwrap_or((spec, ""));
    match name {
        "arith" => Ok(problems(name, query, 2, "+")?
            .into_iter()
            .map(|p| Example::Pair {
                prompt: format!("{}{}{}=", p.a, p.op, p.b),
                response: p.result.to_string(),
            })
            .collect()),
        "instruct" => Ok(problems(name, query, 1, "+-*")?
            .into_iter()
            .map(|p| Example::Pair {
                prompt: p.instruction(),
                response: p.result.to_string(),
            })
            .collect()),
        "preferences" => {
            let (query, wrong) = take_param(query, "rejected");
            let wrong = match wrong.as_deref() {
                None | Some("verbose") => false,
                Some("wrong") => true,
                Some(other) => {
                    return Err(DataError::Builtin(format!(
                        "preferences: rejected={other:?} (use verbose or wrong)"
                    )));
                }
            };
            Ok(problems(name, &query, 1, "+-*")?
                .into_iter()
                .map(|p| Example::Preference {
                    prompt: Prompt::Text(p.instruction()),
                    chosen: p.result.to_string(),
                    rejected: if wrong {
                        (p.result + 1).to_string()
                    } else {
                        format!("The answer is {}.", p.result)
                    },
                })
                .collect())
        }
        other => Err(DataError::Builtin(format!(
            "{other:?} does not exist (available: arith, instruct, preferences)"
        ))),
    }
}

/// `query` without `key=...`, and that parameter's value.
fn take_param(query: &str, key: &str) -> (String, Option<String>) {
    let mut value = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == key => {
                value = Some(v.to_string());
                false
            }
            _ => true,
        })
        .collect();
    (rest.join("&"), value)
}

/// One arithmetic problem.
struct Problem {
    a: i64,
    op: char,
    b: i64,
    result: i64,
}

impl Problem {
    /// The problem as an instruction.
    fn instruction(&self) -> String {
        let word = match self.op {
            '+' => "plus",
            '-' => "minus",
            _ => "times",
        };
        format!(
            "What is {} {word} {}? Answer with the number only.",
            self.a, self.b
        )
    }
}

/// Every problem of `digits`-digit operands for each op of `ops` (from `query`, or the
/// defaults given).
fn problems(
    name: &str,
    query: &str,
    mut digits: u32,
    ops: &str,
) -> Result<Vec<Problem>, DataError> {
    let mut ops = ops.to_string();
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        let bad = || DataError::Builtin(format!("{name}: bad parameter {kv:?}"));
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
                let result = match op {
                    '+' => a + b,
                    '-' => a - b,
                    _ => a * b,
                };
                out.push(Problem { a, op, b, result });
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

    #[test]
    fn instructions_and_preferences() {
        let ex = load("instruct").unwrap();
        assert_eq!(ex.len(), 300);
        assert!(ex.contains(&Example::Pair {
            prompt: "What is 7 times 8? Answer with the number only.".into(),
            response: "56".into()
        }));
        let prefs = load("preferences?ops=+").unwrap();
        assert_eq!(prefs.len(), 100);
        assert!(prefs.contains(&Example::Preference {
            prompt: Prompt::Text("What is 7 plus 8? Answer with the number only.".into()),
            chosen: "15".into(),
            rejected: "The answer is 15.".into(),
        }));
        let wrong = load("preferences?rejected=wrong&ops=-").unwrap();
        assert!(
            matches!(&wrong[0], Example::Preference { chosen, rejected, .. } if chosen == "0" && rejected == "1")
        );
        assert!(load("preferences?rejected=maybe").is_err());
    }
}
