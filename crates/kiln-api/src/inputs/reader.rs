//! Reads a JSON object field by field, collecting every violation instead of stopping at the
//! first, so that one 422001 answer (or one `kiln generate` error) lists everything to fix.
//!
//! Types are strict: a string `"5"` is not an integer, `5.5` is not an integer, `true` is not a
//! number, and `null` is not a value of any field (an absent field takes its default). `5.0` is
//! the integer 5, as JSON Schema's `integer` says (clients whose numbers are all floats send it).

use super::Violation;
use serde_json::{Map, Value};

/// One choice of a closed set of strings (an enum field of a schema).
pub(crate) trait Choice: Copy + 'static {
    const ALL: &'static [Self];
    /// The name on the wire, as the schema lists it.
    fn name(self) -> &'static str;
}

/// The object being read; what is left in it at the end are unknown fields.
pub(crate) struct FieldReader<'v> {
    /// Prepended to field names in violations (`"image_size."` for a nested object).
    path: &'static str,
    fields: Map<String, Value>,
    violations: &'v mut Vec<Violation>,
}

impl<'v> FieldReader<'v> {
    pub(crate) fn new(
        path: &'static str,
        fields: Map<String, Value>,
        violations: &'v mut Vec<Violation>,
    ) -> Self {
        Self {
            path,
            fields,
            violations,
        }
    }

    /// A reader of an object nested in this one, recording into the same list.
    pub(crate) fn nested(
        &mut self,
        path: &'static str,
        fields: Map<String, Value>,
    ) -> FieldReader<'_> {
        FieldReader::new(path, fields, self.violations)
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.fields.contains_key(name)
    }

    /// Whether a required field is absent (then recorded as a violation saying what it must be).
    pub(crate) fn missing(&mut self, name: &str, what: &str) -> bool {
        let missing = !self.has(name);
        if missing {
            self.violate(name, format!("required: {what}"), None);
        }
        missing
    }

    /// Records a violation of `name` (a field of this object).
    pub(crate) fn violate(&mut self, name: &str, rule: impl Into<String>, value: Option<&Value>) {
        self.violations
            .push(Violation::new(format!("{}{name}", self.path), rule, value));
    }

    /// Removes and returns the field. `None` if absent.
    pub(crate) fn take(&mut self, name: &str) -> Option<Value> {
        self.fields.remove(name)
    }

    /// A string field; `check` turns it into the field's value or says which rule it breaks.
    /// `None` when absent or invalid (then a violation has been recorded).
    pub(crate) fn string<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.take(name)?;
        let Value::String(s) = &value else {
            self.violate(name, "must be a string", Some(&value));
            return None;
        };
        check(s)
            .map_err(|rule| self.violate(name, rule, Some(&value)))
            .ok()
    }

    /// An integer field; `check` range-checks (and may round) it.
    pub(crate) fn integer<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(i128) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.take(name)?;
        let whole = |x: f64| (x.is_finite() && x.fract() == 0.0).then_some(x as i128);
        let Some(n) = value
            .as_i64()
            .map(i128::from)
            .or_else(|| value.as_u64().map(i128::from))
            .or_else(|| value.as_f64().and_then(whole))
        else {
            self.violate(name, "must be an integer", Some(&value));
            return None;
        };
        check(n)
            .map_err(|rule| self.violate(name, rule, Some(&value)))
            .ok()
    }

    /// A number field (integers are numbers too).
    pub(crate) fn number<T>(
        &mut self,
        name: &str,
        check: impl FnOnce(f64) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.take(name)?;
        let Some(x) = value.as_f64() else {
            self.violate(name, "must be a number", Some(&value));
            return None;
        };
        check(x)
            .map_err(|rule| self.violate(name, rule, Some(&value)))
            .ok()
    }

    pub(crate) fn boolean(&mut self, name: &str) -> Option<bool> {
        let value = self.take(name)?;
        let b = value.as_bool();
        if b.is_none() {
            self.violate(name, "must be true or false", Some(&value));
        }
        b
    }

    /// A string naming one of `C::ALL`.
    pub(crate) fn choice<C: Choice>(&mut self, name: &str) -> Option<C> {
        self.string(name, |s| {
            C::ALL
                .iter()
                .copied()
                .find(|c| c.name() == s)
                .ok_or_else(one_of::<C>)
        })
    }

    /// Records the fields nobody read as unknown, naming the allowed ones (computed only then).
    pub(crate) fn finish(mut self, allowed: impl FnOnce() -> Vec<String>) {
        if self.fields.is_empty() {
            return;
        }
        let rule = format!("unknown field; allowed fields: {}", allowed().join(", "));
        let unknown: Vec<String> = self.fields.keys().cloned().collect();
        for name in unknown {
            self.violate(&name, rule.clone(), None);
        }
    }
}

/// "must be one of: a, b, c" for a choice's set (quoted, since some names contain spaces).
pub(crate) fn one_of<C: Choice>() -> String {
    let names: Vec<String> = C::ALL.iter().map(|c| format!("\"{}\"", c.name())).collect();
    format!("must be one of: {}", names.join(", "))
}

/// Checks `n` against `min..=max`.
pub(crate) fn within(n: i128, min: u32, max: u32) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|v| (min..=max).contains(v))
        .ok_or_else(|| format!("must be an integer between {min} and {max}"))
}

/// The raw values [`rounded_side`] accepts: those that round into `min..=max` (both multiples
/// of `step`), half a step wider each way.
pub(crate) fn rounded_side_bounds(step: u32, min: u32, max: u32) -> (u32, u32) {
    (min - step / 2, max + step / 2 - 1)
}

/// Rounds `n` to the nearest multiple of `step` (a tie goes up), then checks `min..=max`. The
/// hosted API documents rounding rather than refusing sizes that are not multiples.
pub(crate) fn rounded_side(n: i128, step: u32, min: u32, max: u32) -> Result<u32, String> {
    let step = i128::from(step);
    let rounded = (n + step / 2).div_euclid(step) * step;
    u32::try_from(rounded).ok().filter(|v| (min..=max).contains(v)).ok_or_else(|| {
        format!("must be between {min} and {max} after rounding to the nearest multiple of {step} (rounds to {rounded})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_side_bounds_are_exactly_what_rounds_into_range() {
        for (step, min, max) in [(32, 256, 1440), (16, 64, 2048)] {
            let (low, high) = rounded_side_bounds(step, min, max);
            let accepted: Vec<i128> = (0..3000)
                .filter(|n| rounded_side(*n, step, min, max).is_ok())
                .collect();
            assert_eq!(accepted.first(), Some(&i128::from(low)));
            assert_eq!(accepted.last(), Some(&i128::from(high)));
            assert_eq!(accepted.len() as u32, high - low + 1);
        }
    }
}
