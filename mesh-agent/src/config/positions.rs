//! Where each value of a YAML text starts, by field path (`workloads[1].ips[0]`), from the YAML
//! parser's own event spans: validation errors point at the value they are about, also when the
//! same value is written twice.
use std::collections::HashMap;

use granit_parser::{Event, Parser};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// The start of every node of the first document, by path.
#[derive(Debug, Default)]
pub struct Positions {
    by_path: HashMap<String, Position>,
}

enum Frame {
    Mapping { key: Option<String> },
    Sequence { next: usize },
}

impl Positions {
    /// Indexes `text`; a text the parser rejects gives what was indexed before the error (serde
    /// reports the syntax error itself).
    pub fn index(text: &str) -> Positions {
        let mut by_path = HashMap::new();
        // The path of each open collection, and of the node being read.
        let mut stack: Vec<(Frame, String)> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let position = Position {
                line: span.start.line(),
                column: span.start.col() + 1,
            };
            let starts_node = matches!(
                event,
                Event::Scalar(..)
                    | Event::SequenceStart(..)
                    | Event::MappingStart(..)
                    | Event::Alias(_)
            );
            if !starts_node {
                match event {
                    Event::SequenceEnd | Event::MappingEnd => {
                        stack.pop();
                    }
                    Event::DocumentEnd => break,
                    _ => {}
                }
                continue;
            }
            // A scalar in key position names the next value; it is not a node of its own here.
            if let (Some((Frame::Mapping { key }, _)), Event::Scalar(text, ..)) =
                (stack.last_mut(), &event)
            {
                if key.is_none() {
                    *key = Some(text.to_string());
                    continue;
                }
            }
            let path = match stack.last_mut() {
                None => String::new(),
                Some((Frame::Mapping { key }, parent)) => {
                    let key = key.take().unwrap_or_default();
                    if parent.is_empty() {
                        key
                    } else {
                        format!("{parent}.{key}")
                    }
                }
                Some((Frame::Sequence { next }, parent)) => {
                    *next += 1;
                    format!("{parent}[{}]", *next - 1)
                }
            };
            by_path.entry(path.clone()).or_insert(position);
            match event {
                Event::MappingStart(..) => stack.push((Frame::Mapping { key: None }, path)),
                Event::SequenceStart(..) => stack.push((Frame::Sequence { next: 0 }, path)),
                _ => {}
            }
        }
        Positions { by_path }
    }

    /// Where `path` starts; for a field that is not written (a default), where the nearest
    /// enclosing value starts.
    pub fn find(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(p) = self.by_path.get(path) {
                return Some(*p);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
a: 1
list:
  - name: x
    ips: [10.0.0.1, 10.0.0.1]
  - name: x
    nested: { k: v }
";

    fn at(p: &Positions, path: &str) -> (usize, usize) {
        let pos = p.find(path).unwrap_or_else(|| panic!("{path} not found"));
        (pos.line, pos.column)
    }

    #[test]
    fn every_value_has_its_own_position_even_when_repeated() {
        let p = Positions::index(TEXT);
        assert_eq!(at(&p, "a"), (1, 4));
        assert_eq!(at(&p, "list[0].name"), (3, 11));
        assert_eq!(at(&p, "list[1].name"), (5, 11));
        assert_eq!(at(&p, "list[0].ips[0]"), (4, 11));
        assert_eq!(at(&p, "list[0].ips[1]"), (4, 21));
        assert_eq!(at(&p, "list[1].nested.k"), (6, 18));
    }

    #[test]
    fn a_field_left_out_points_at_its_item() {
        let p = Positions::index(TEXT);
        assert_eq!(at(&p, "list[1].namespace"), at(&p, "list[1]"));
        assert_eq!(at(&p, "list[1]"), (5, 5));
        assert!(p.find("other").is_none());
    }
}
