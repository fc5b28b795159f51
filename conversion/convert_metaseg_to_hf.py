"""Convert an official MetaSeg (MMSegmentation) checkpoint into a Hugging Face model folder.

    python conversion/convert_metaseg_to_hf.py --checkpoint metaseg_tiny_ade.pth --output_dir metaseg-t-ade20k
    python conversion/convert_metaseg_to_hf.py --checkpoint mscan_t.pth --output_dir mscan-t --backbone_only

The checkpoint is read with `torch.load(weights_only=True)`: a file carrying pickled code is refused.
"""

import argparse
import sys

from metaseg_hf.conversion import CheckpointError, convert_checkpoint
from metaseg_hf.hub import push_folder_to_hub
from metaseg_hf.presets import VARIANTS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="official .pth checkpoint")
    parser.add_argument("--output_dir", required=True, help="folder to write the converted model into")
    parser.add_argument("--model_name", choices=list(VARIANTS), help="variant (inferred from the weights if omitted)")
    parser.add_argument("--backbone_only", action="store_true", help="the checkpoint is an ImageNet MSCAN backbone")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the folder to this Hub repository")
    parser.add_argument("--hub_token", help="Hub token (defaults to the logged-in user's)")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        convert_checkpoint(args.checkpoint, args.output_dir, args.model_name, args.backbone_only)
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.push_to_hub:
        url = push_folder_to_hub(args.output_dir, args.push_to_hub, token=args.hub_token, private=args.private)
        print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
