//! Named groups of flat `f32` and the layout that describes them.
//!
//! Past the `tasks` crate a model is only this: groups named `backbone` and
//! `head/<task>`, each a flat `Vec<f32>` made of tensors laid end to end. Both
//! sides of an exchange check the [`Fingerprint`] of the layout (names,
//! shapes, offsets) before they trust each other's numbers.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ProtocolError;

/// Name of the shared backbone group.
pub const BACKBONE: &str = "backbone";

/// Name of the head group of `task`: `head/<task>`.
pub fn head_group(task: &str) -> String {
    format!("head/{task}")
}

/// The task of a head group name, `None` for anything else.
pub fn task_of_group(group: &str) -> Option<&str> {
    group.strip_prefix("head/")
}

/// One tensor inside a group: its name (e.g. `backbone.0.weight`), shape and
/// offset (in values) from the start of the group's flat vector.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<u64>,
    pub offset: u64,
}

impl TensorSpec {
    /// Number of values (product of the shape; 1 for a scalar).
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The tensors of one group, contiguous and in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GroupLayout {
    pub name: String,
    pub tensors: Vec<TensorSpec>,
}

impl GroupLayout {
    /// Number of `f32` values in the group.
    pub fn len(&self) -> u64 {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fingerprint of this group alone (name, tensor names, shapes, offsets).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        self.feed(&mut ctx);
        Fingerprint::from_digest(ctx.finish())
    }

    fn feed(&self, ctx: &mut ring::digest::Context) {
        feed_str(ctx, &self.name);
        ctx.update(&(self.tensors.len() as u64).to_le_bytes());
        for t in &self.tensors {
            feed_str(ctx, &t.name);
            ctx.update(&(t.shape.len() as u64).to_le_bytes());
            for d in &t.shape {
                ctx.update(&d.to_le_bytes());
            }
            ctx.update(&t.offset.to_le_bytes());
        }
    }
}

fn feed_str(ctx: &mut ring::digest::Context, s: &str) {
    ctx.update(&(s.len() as u64).to_le_bytes());
    ctx.update(s.as_bytes());
}

/// A model's layout: its groups in a fixed order (the backbone first, then
/// heads sorted by task name, as `tasks` builds them).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub groups: Vec<GroupLayout>,
}

impl Layout {
    /// Checks what a decoder cannot assume: unique group and tensor names,
    /// contiguous offsets, no empty group.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        let mut names = std::collections::BTreeSet::new();
        for g in &self.groups {
            if !names.insert(g.name.as_str()) {
                return Err(ProtocolError::InvalidLayout(format!(
                    "group `{}` appears twice",
                    g.name
                )));
            }
            let mut next = 0u64;
            for t in &g.tensors {
                if t.offset != next {
                    return Err(ProtocolError::InvalidLayout(format!(
                        "tensor `{}` of group `{}` starts at {} instead of {next}",
                        t.name, g.name, t.offset
                    )));
                }
                next = next.checked_add(t.numel()).ok_or_else(|| {
                    ProtocolError::InvalidLayout(format!("group `{}` overflows", g.name))
                })?;
            }
            if next == 0 {
                return Err(ProtocolError::InvalidLayout(format!(
                    "group `{}` is empty",
                    g.name
                )));
            }
        }
        Ok(())
    }

    /// The group called `name`.
    pub fn group(&self, name: &str) -> Option<&GroupLayout> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// Names of the groups, in order.
    pub fn group_names(&self) -> impl Iterator<Item = &str> {
        self.groups.iter().map(|g| g.name.as_str())
    }

    /// Total number of values.
    pub fn num_params(&self) -> u64 {
        self.groups.iter().map(GroupLayout::len).sum()
    }

    /// The layout restricted to `names` (kept in this layout's order): what a
    /// node that holds only some tasks has.
    pub fn subset<S: AsRef<str>>(&self, names: &[S]) -> Result<Layout, ProtocolError> {
        for n in names {
            if self.group(n.as_ref()).is_none() {
                return Err(ProtocolError::UnknownGroup(n.as_ref().to_string()));
            }
        }
        Ok(Layout {
            groups: self
                .groups
                .iter()
                .filter(|g| names.iter().any(|n| n.as_ref() == g.name))
                .cloned()
                .collect(),
        })
    }

    /// SHA-256 of the canonical description (group names, tensor names,
    /// shapes, offsets, in order).
    pub fn fingerprint(&self) -> Fingerprint {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"cohort-layout-v1");
        ctx.update(&(self.groups.len() as u64).to_le_bytes());
        for g in &self.groups {
            g.feed(&mut ctx);
        }
        Fingerprint::from_digest(ctx.finish())
    }

    /// Checks that `params` has exactly this layout's groups, each of the
    /// right length.
    pub fn check(&self, params: &ParamGroups) -> Result<(), ProtocolError> {
        for g in &self.groups {
            let v = params.get(&g.name).ok_or_else(|| {
                ProtocolError::LayoutMismatch(format!("group `{}` missing", g.name))
            })?;
            if v.len() as u64 != g.len() {
                return Err(ProtocolError::GroupLength {
                    group: g.name.clone(),
                    expected: g.len(),
                    got: v.len() as u64,
                });
            }
        }
        if let Some(extra) = params.names().find(|n| self.group(n).is_none()) {
            return Err(ProtocolError::UnknownGroup(extra.to_string()));
        }
        Ok(())
    }

    /// All groups filled with zeros.
    pub fn zeros(&self) -> ParamGroups {
        let mut p = ParamGroups::default();
        for g in &self.groups {
            p.insert(g.name.clone(), vec![0.0; g.len() as usize]);
        }
        p
    }
}

/// SHA-256 fingerprint of a [`Layout`] or [`GroupLayout`]. Displays as the
/// first 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    fn from_digest(d: ring::digest::Digest) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Named groups of flat `f32` values: the currency of everything past
/// `tasks`. Ordered by name, so iteration is deterministic.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ParamGroups {
    groups: BTreeMap<String, Vec<f32>>,
}

impl ParamGroups {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, values: Vec<f32>) -> Option<Vec<f32>> {
        self.groups.insert(name.into(), values)
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.groups.get(name).map(Vec::as_slice)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        self.groups.get_mut(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<Vec<f32>> {
        self.groups.remove(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.groups.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.groups.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &[f32])> {
        self.groups.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Vec<f32>)> {
        self.groups.iter_mut().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.groups.len()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Total number of values over all groups.
    pub fn num_values(&self) -> usize {
        self.groups.values().map(Vec::len).sum()
    }

    /// `self - base` for every group of `self` (which `base` must also have,
    /// with the same length).
    pub fn delta_from(&self, base: &ParamGroups) -> Result<ParamGroups, ProtocolError> {
        let mut out = ParamGroups::default();
        for (name, v) in &self.groups {
            let b = base
                .get(name)
                .ok_or_else(|| ProtocolError::UnknownGroup(name.clone()))?;
            if b.len() != v.len() {
                return Err(ProtocolError::GroupLength {
                    group: name.clone(),
                    expected: b.len() as u64,
                    got: v.len() as u64,
                });
            }
            out.insert(name.clone(), v.iter().zip(b).map(|(x, y)| x - y).collect());
        }
        Ok(out)
    }
}

impl FromIterator<(String, Vec<f32>)> for ParamGroups {
    fn from_iter<I: IntoIterator<Item = (String, Vec<f32>)>>(iter: I) -> Self {
        ParamGroups {
            groups: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            groups: vec![
                GroupLayout {
                    name: BACKBONE.into(),
                    tensors: vec![
                        TensorSpec {
                            name: "backbone.0.weight".into(),
                            shape: vec![4, 3],
                            offset: 0,
                        },
                        TensorSpec {
                            name: "backbone.0.bias".into(),
                            shape: vec![4],
                            offset: 12,
                        },
                    ],
                },
                GroupLayout {
                    name: head_group("a"),
                    tensors: vec![TensorSpec {
                        name: "head/a.weight".into(),
                        shape: vec![2, 4],
                        offset: 0,
                    }],
                },
            ],
        }
    }

    #[test]
    fn fingerprint_changes_with_shape_and_subset() {
        let l = layout();
        l.validate().expect("valid");
        let mut m = l.clone();
        m.groups[0].tensors[1].shape = vec![5];
        assert_ne!(l.fingerprint(), m.fingerprint());
        let s = l.subset(&[BACKBONE]).expect("subset");
        assert_ne!(s.fingerprint(), l.fingerprint());
        assert_eq!(s.groups[0].fingerprint(), l.groups[0].fingerprint());
        assert!(l.subset(&["head/zzz"]).is_err());
    }

    #[test]
    fn validate_refuses_gaps_and_duplicates() {
        let mut l = layout();
        l.groups[0].tensors[1].offset = 13;
        assert!(matches!(l.validate(), Err(ProtocolError::InvalidLayout(_))));
        let mut l = layout();
        l.groups[1].name = BACKBONE.into();
        assert!(l.validate().is_err());
    }

    #[test]
    fn check_catches_wrong_lengths() {
        let l = layout();
        let mut p = l.zeros();
        l.check(&p).expect("zeros fit");
        p.get_mut(BACKBONE).expect("backbone").push(1.0);
        assert!(matches!(
            l.check(&p),
            Err(ProtocolError::GroupLength { .. })
        ));
    }
}
