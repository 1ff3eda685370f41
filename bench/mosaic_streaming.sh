# Sourced by the benchmarks against Mosaic Streaming (bench/open_stream.sh, bench/stream_throughput.sh): installs
# mosaicml-streaming 0.13 into the venv on first use WITHOUT its dependencies. Its metadata asks for torch 2.14
# (through torchvision), numpy < 2.2 and transformers < 5, which would replace the pinned test oracles (torch
# 2.13.0 is what tch links against); it runs with the venv's versions plus torchvision 0.28 (torch 2.13's).
m3d_mosaic_streaming() {
  if ! "$M3D_VENV/bin/python" -c "from streaming import StreamingDataset, MDSWriter; import torchvision" 2>/dev/null; then
    # The modules `import streaming` needs that the venv's other packages do not bring (found by trying it in a
    # fresh venv: its compression codecs, its hash and its registry).
    "$M3D_VENV/bin/pip" install --quiet --no-deps "mosaicml-streaming==0.13.0" "torchvision==0.28.*" \
      "brotli" "python-snappy" "cramjam" "zstd" "xxhash>=3,<4" "catalogue"
  fi
}
