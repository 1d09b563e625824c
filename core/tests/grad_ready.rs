//! The backward pass tells a listener which gradients are final as it goes (a worker sends
//! them while the rest runs): every range it reports is already the final gradient, the
//! reports move from the end of the flat vector to its start and end at 0, and listening
//! changes no bit of the result.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use capsnet_core::data::Batch;
use capsnet_core::net::{Net, NetWorkspace};
use capsnet_core::{BatchStats, CapsNetConfig, CnnConfig, GradReady, Params};

/// Every report: where the final part starts, a copy of it, and the loss it came with.
#[derive(Default)]
struct Recorder(Vec<(usize, Vec<f32>, f64)>);

impl GradReady for Recorder {
    fn ready(&mut self, stats: &BatchStats, from: usize, tail: &[f32]) {
        self.0.push((from, tail.to_vec(), stats.total_loss()));
    }
}

fn batch(side: usize, classes: usize, b: usize, objects: usize, seed: u64) -> Batch {
    let px = side * side;
    let images: Vec<f32> = common::randn(b * px, 0.5, seed)
        .into_iter()
        .map(|x| x.abs().min(1.0))
        .collect();
    // Object o of image i has class (i + o) mod classes: an image's two objects differ.
    let labels: Vec<usize> = (0..objects)
        .flat_map(|o| (0..b).map(move |i| (i + o) % classes))
        .collect();
    let mut out = Batch::single(images, labels, side, side);
    if objects > 1 {
        out.objects = objects;
        out.parts = common::randn(objects * b * px, 0.5, seed + 1)
            .into_iter()
            .map(|x| x.abs().min(1.0))
            .collect();
    }
    out
}

/// Runs one batch with and without a listener and checks what it heard; returns where each
/// report started.
fn check(net: &Net, batch: &Batch) -> Vec<usize> {
    let params = net.init_params(7);
    let b = batch.images.len() / (batch.rows * batch.cols);
    let keys: Vec<u64> = (0..b as u64).collect();
    let (mut plain, mut heard) = (Params::zeros(net.layout()), Params::zeros(net.layout()));
    // Stale values in the listener's buffer must not matter.
    heard.data.iter_mut().for_each(|g| *g = f32::NAN);
    let mut ws = NetWorkspace::new();
    let st = net
        .train_batch(&params, batch, &keys, &mut plain, &mut ws)
        .unwrap();
    let mut rec = Recorder::default();
    let st2 = net
        .train_batch_ready(&params, batch, &keys, &mut heard, &mut ws, &mut rec)
        .unwrap();
    assert_eq!(st.total_loss(), st2.total_loss());
    assert_eq!(
        plain.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        heard.data.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "listening changed the gradient"
    );
    let n = plain.data.len();
    let mut last = n;
    for (from, tail, loss) in &rec.0 {
        assert!(
            *from < last,
            "reports go from the end to the start: {from} after {last}"
        );
        assert_eq!(tail.len(), n - from);
        assert_eq!(
            *loss,
            st.total_loss(),
            "the loss is known from the first report"
        );
        assert!(
            tail.iter()
                .zip(&plain.data[*from..])
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "the range from {from} was reported before it was final"
        );
        last = *from;
    }
    assert_eq!(last, 0, "the last report covers the whole gradient");
    rec.0.iter().map(|r| r.0).collect()
}

/// Where tensor `name` starts in the flat vector.
fn at(net: &Net, name: &str) -> usize {
    net.layout()
        .specs()
        .iter()
        .find(|s| s.name == name)
        .unwrap()
        .offset
}

#[test]
fn the_capsule_network_reports_decoder_digit_primary_then_conv1() {
    let cfg = CapsNetConfig::tiny();
    let net = Net::new(&cfg, None).unwrap();
    let want = vec![
        at(&net, "decoder.0.weight"),
        at(&net, "digit.weight"),
        at(&net, "primary.weight"),
        0,
    ];
    let side = cfg.image_size;
    assert_eq!(check(&net, &batch(side, cfg.classes, 3, 1, 1)), want);
    // Two objects per image (overlapping pairs): the same reports.
    assert!(cfg.classes >= 2);
    assert_eq!(check(&net, &batch(side, cfg.classes, 3, 2, 2)), want);
}

#[test]
fn the_cnn_baseline_reports_its_dense_layers_then_each_convolution() {
    let cnn = CnnConfig::tiny();
    let mut caps = CapsNetConfig::tiny();
    caps.image_size = cnn.image_size;
    caps.classes = cnn.classes;
    let net = Net::new(&caps, Some(&cnn)).unwrap();
    let want = vec![
        at(&net, "fc.0.weight"),
        at(&net, "conv.2.weight"),
        at(&net, "conv.1.weight"),
        0,
    ];
    assert_eq!(
        check(&net, &batch(cnn.image_size, cnn.classes, 4, 1, 5)),
        want
    );
}
