use m3d_models::clip::SingleProcess;
use m3d_models::tokenizer::Padding;
use m3d_worker::batch::stack_volumes;
use m3d_worker::data::{LoaderOptions, ShardLoader};
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (_vs, clip, tok) =
        m3d_worker::eval::load_clip(std::path::Path::new(&a[1]), tch::Device::Cpu).unwrap();
    let l = ShardLoader::open(&a[2], LoaderOptions::default()).unwrap();
    let idx: Vec<u64> = (0..12).collect();
    let s = l.load(&idx).unwrap();
    let views: Vec<(&[f32], [usize; 4])> =
        s.iter().map(|s| (s.image.as_slice(), s.shape)).collect();
    let im = stack_volumes(&views).unwrap();
    println!(
        "image mean {} std {} per-sample-std-across {}",
        im.mean(tch::Kind::Float),
        im.std(true),
        im.std_dim(0, true, false).mean(tch::Kind::Float)
    );
    let texts: Vec<&str> = s
        .iter()
        .map(|s| s.sample.report.as_deref().unwrap())
        .collect();
    let e = tok
        .encode_batch(&texts, 32, Padding::MaxLength, true)
        .unwrap();
    e.input_ids.get(0).print();
    let o = tch::no_grad(|| {
        clip.forward_t(&im, &e.input_ids, &e.attention_mask, &SingleProcess, false)
    })
    .unwrap();
    let ci = o.image_features.matmul(&o.image_features.tr());
    let ct = o.text_features.matmul(&o.text_features.tr());
    println!(
        "img cos min {} mean {}",
        ci.min(),
        ci.mean(tch::Kind::Float)
    );
    println!(
        "txt cos min {} mean {}",
        ct.min(),
        ct.mean(tch::Kind::Float)
    );
    o.logits.print();
}
