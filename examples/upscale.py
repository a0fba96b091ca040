"""Upscale images, folders and videos with an SST model (the command line of ``rfsr_cuda.upscale``).

    python examples/upscale.py photo.jpg --scale 4 --weights sst_light_x4.safetensors
    python examples/upscale.py -i photos/ -o upscaled/ --recursive --weights sst_light_x2.safetensors
    python examples/upscale.py clip.mp4 --weights sst_light_x2.safetensors -t 256 --precision bf16

Run with --help for every option. Exit status: 0 when every input was written, 1 when some input failed (the
others are still processed), 2 for a usage problem (no weights, missing input, a scale the weights do not have).
"""
import sys

from rfsr_cuda.upscale.cli import build_parser, main  # noqa: F401  (build_parser for docs/tests)

if __name__ == "__main__":
    sys.exit(main())
