# Sourced by the benchmarks against Mosaic Streaming (bench/open_stream.sh, bench/stream_throughput.sh): installs
# mosaicml-streaming 0.13 into the venv on first use WITHOUT its dependencies. Its metadata asks for torch 2.14
# (through torchvision), numpy < 2.2 and transformers < 5, which would replace the pinned test oracles (torch
# 2.13.0 is what tch links against); it runs with the venv's versions plus torchvision 0.28 (torch 2.13's).
m3d_mosaic_streaming() {
  if ! "$M3D_VENV/bin/python" -c "import streaming, torchvision" 2>/dev/null; then
    "$M3D_VENV/bin/pip" install --quiet --no-deps "mosaicml-streaming==0.13.0" "torchvision==0.28.*"
  fi
}
