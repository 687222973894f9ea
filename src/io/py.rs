//! Python's text conventions for the metadata sd-scripts writes: `str(float)` and `json.dumps` (", " and ": "
//! separators, insertion order, non-ASCII escaped).

/// Python's `str(float)`: `2.0`, `0.0001`, `1e-05`.
pub fn py_float(x: f64) -> String {
    if x == x.trunc() && x.abs() < 1e16 {
        format!("{x:.1}")
    } else if x.abs() < 1e-4 && x != 0.0 {
        let s = format!("{x:e}");
        let (mant, exp) = s.split_once('e').expect("exponent");
        let e: i32 = exp.parse().expect("integer exponent");
        format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    } else {
        format!("{x}")
    }
}

/// A Python value as `json.dumps` sees it; dicts keep their insertion order.
#[derive(Clone, Debug, PartialEq)]
pub enum Py {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Py>),
    Dict(Vec<(String, Py)>),
}

impl From<&str> for Py {
    fn from(s: &str) -> Self {
        Py::Str(s.to_string())
    }
}

impl From<bool> for Py {
    fn from(b: bool) -> Self {
        Py::Bool(b)
    }
}

impl From<usize> for Py {
    fn from(n: usize) -> Self {
        Py::Int(n as i64)
    }
}

impl From<f64> for Py {
    fn from(x: f64) -> Self {
        Py::Float(x)
    }
}

impl<T: Into<Py>> From<Option<T>> for Py {
    fn from(v: Option<T>) -> Self {
        v.map_or(Py::None, Into::into)
    }
}

fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Py {
    /// `json.dumps(self)`.
    pub fn dumps(&self) -> String {
        let mut out = String::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut String) {
        match self {
            Py::None => out.push_str("null"),
            Py::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Py::Int(n) => out.push_str(&n.to_string()),
            Py::Float(x) if x.is_nan() => out.push_str("NaN"),
            Py::Float(x) if x.is_infinite() => out.push_str(if *x > 0.0 { "Infinity" } else { "-Infinity" }),
            Py::Float(x) => out.push_str(&py_float(*x)),
            Py::Str(s) => quote(s, out),
            Py::List(v) => {
                out.push('[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    x.write(out);
                }
                out.push(']');
            }
            Py::Dict(v) => {
                out.push('{');
                for (i, (k, x)) in v.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    quote(k, out);
                    out.push_str(": ");
                    x.write(out);
                }
                out.push('}');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_and_json_as_python_writes_them() {
        assert_eq!(py_float(2.0), "2.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(0.5), "0.5");
        // json.dumps({"a": [1, 2.5, None], "é": {"t": True}}) in Python 3
        let v = Py::Dict(vec![
            ("a".into(), Py::List(vec![Py::Int(1), Py::Float(2.5), Py::None])),
            ("é".into(), Py::Dict(vec![("t".into(), Py::Bool(true))])),
        ]);
        assert_eq!(v.dumps(), r#"{"a": [1, 2.5, null], "\u00e9": {"t": true}}"#);
    }
}
