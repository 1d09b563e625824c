//! Named parameter tensors stored in one flat vector.
//!
//! The model's parameters (and, with the same layout, its gradients and Adam moments) live in a
//! single `Vec<f32>`; each name addresses a contiguous range of it. One flat vector makes the
//! optimizer a single loop and lets the distributed code address chunks by range.

pub use capsnet_config::layout::{
    CONV1_B, CONV1_W, DECODER_0, DIGIT_W, PRIMARY_B, PRIMARY_W, ParamLayout, ParamSpec,
};

use crate::error::{CoreError, Result};

/// A flat vector of floats with a [`ParamLayout`]: parameters, gradients or optimizer moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    layout: ParamLayout,
    pub data: Vec<f32>,
}

impl Params {
    pub fn zeros(layout: &ParamLayout) -> Self {
        Params {
            layout: layout.clone(),
            data: vec![0.0; layout.total()],
        }
    }

    /// Wraps a flat vector; its length must match the layout.
    pub fn from_flat(layout: &ParamLayout, data: Vec<f32>) -> Result<Self> {
        if data.len() != layout.total() {
            return Err(CoreError::Shape {
                op: "Params::from_flat",
                expected: vec![layout.total()],
                got: vec![data.len()],
            });
        }
        Ok(Params {
            layout: layout.clone(),
            data,
        })
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub(crate) fn at(&self, index: usize) -> &[f32] {
        &self.data[self.layout.specs()[index].range()]
    }

    pub(crate) fn at_mut(&mut self, index: usize) -> &mut [f32] {
        let r = self.layout.specs()[index].range();
        &mut self.data[r]
    }

    /// The tensor called `name`, if the layout has it.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.layout.get(name).map(|s| &self.data[s.range()])
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let r = self.layout.get(name)?.range();
        Some(&mut self.data[r])
    }

    /// Named views in layout order.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamSpec, &[f32])> {
        self.layout
            .specs()
            .iter()
            .map(move |s| (s, &self.data[s.range()]))
    }

    pub fn fill(&mut self, v: f32) {
        self.data.iter_mut().for_each(|x| *x = v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CapsNetConfig;

    #[test]
    fn paper_network_has_the_papers_parameter_count() {
        let l = ParamLayout::for_config(&CapsNetConfig::default());
        assert_eq!(l.total(), 8_215_568);
        let without_decoder: usize = l
            .specs()
            .iter()
            .filter(|s| !s.name.starts_with("decoder"))
            .map(|s| s.len())
            .sum();
        assert_eq!(without_decoder, 6_804_224);
        assert_eq!(
            l.get("digit.weight").map(|s| s.shape.clone()),
            Some(vec![1152, 10, 16, 8])
        );
        assert_eq!(
            l.get("decoder.2.weight").map(|s| s.shape.clone()),
            Some(vec![784, 1024])
        );
        assert_eq!(l.decoder_layers(), 3);
    }

    #[test]
    fn ranges_tile_the_vector() {
        let l = ParamLayout::for_config(&CapsNetConfig::tiny());
        let mut next = 0;
        for s in l.specs() {
            assert_eq!(s.offset, next);
            next += s.len();
        }
        assert_eq!(next, l.total());
        assert!(Params::from_flat(&l, vec![0.0; 3]).is_err());
    }
}
