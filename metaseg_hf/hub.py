"""Model cards and Hub uploads for MetaSeg model folders (conversion and training share these)."""

import math
import os
import shlex
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

PAPER = "MetaSeg: MetaFormer-based Global Contexts-aware Network for Efficient Semantic Segmentation (WACV 2024)"
OFFICIAL_CODE = "https://github.com/hyunwoo137/MetaSeg"


def render_model_card(config, title: str, sections: dict[str, str], datasets: list[str] | None = None) -> str:
    """A Hub model card (README.md) for a MetaSeg folder: metadata header (`huggingface_hub.ModelCardData`),
    usage, and the given sections."""
    card_data = ModelCardData(
        library_name="transformers", license="mit", pipeline_tag="image-segmentation",
        tags=["metaseg", "semantic-segmentation", "vision"], datasets=list(datasets) if datasets else None,
    )
    architecture = (
        f"MSCAN widths {config.hidden_sizes}, depths {config.depths}; decoder width {config.decoder_hidden_size}; "
        f"{config.num_labels} classes; official test mode `{config.inference_mode}`"
    )
    usage = """```python
from transformers import pipeline

segmenter = pipeline("image-segmentation", model="REPO_OR_FOLDER", trust_remote_code=True)
segments = segmenter("image.jpg")  # one {"label", "mask"} per class present
```

With the `metaseg-hf` package installed (`import metaseg_hf`), `trust_remote_code` is not needed and
`MetaSegForSemanticSegmentation.from_pretrained(...)` / `AutoModelForSemanticSegmentation` work directly."""
    body = [f"# {title}", "", f"MetaSeg, from *{PAPER}* ([official code]({OFFICIAL_CODE})), ported to Transformers by metaseg-hf.", ""]
    body += [f"Architecture: {architecture}.", "", "## How to use", "", usage, ""]
    for heading, text in sections.items():
        body += [f"## {heading}", "", text.strip(), ""]
    body += ["## Licence", "", "MIT, as the official MetaSeg code.", ""]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n" + "\n".join(body)))


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def training_card_sections(data_description: str, id2label: dict, hyperparameters: dict, results: dict | None,
                           command: str | None = None) -> dict[str, str]:
    """Model-card sections (heading -> markdown) for a trained model: training data, training
    procedure (the resolved recipe), evaluation results with a per-class table."""
    names = [id2label[index] for index in sorted(id2label)]
    shown = ", ".join(f"`{name}`" for name in names[:40]) + (f" ... ({len(names)} in all)" if len(names) > 40 else "")
    sections = {"Training data": f"Trained on {data_description}.\n\n{len(names)} classes: {shown}."}
    rows = ["| setting | value |", "|---|---|"] + [f"| {key} | {value} |" for key, value in hyperparameters.items()]
    procedure = "Trained with `examples/train.py` of metaseg-hf (Accelerate).\n\n" + "\n".join(rows)
    if command:
        procedure += f"\n\nCommand:\n\n```bash\n{command}\n```"
    sections["Training procedure"] = procedure
    if results:
        lines = [
            f"Validation (whole-image inference at the official test size, scored at the labels' original resolution): "
            f"**mIoU {_percent(results['mean_iou'])}**, mean accuracy {_percent(results['mean_accuracy'])}, "
            f"overall accuracy {_percent(results['overall_accuracy'])}.",
            "",
            "| class | IoU | accuracy |",
            "|---|---|---|",
        ]
        lines += [f"| {row['name']} | {_percent(row['iou'])} | {_percent(row['accuracy'])} |" for row in results["per_class"]]
        sections["Evaluation results"] = "\n".join(lines)
    return sections


def recorded_command(program: str, argv, secrets=()) -> str:
    """The shell command `program argv...` as the model card records it, every secret (a token given on the
    command line, whatever the flag's spelling) replaced by `<redacted>`, so that no token is published."""
    secrets = [secret for secret in secrets if secret]
    words = []
    for word in argv:
        for secret in secrets:
            word = word.replace(secret, "<redacted>")
        words.append(shlex.quote(word))
    return " ".join([program, *words])


def write_model_card(folder: str | os.PathLike, config, title: str, sections: dict[str, str], datasets=None) -> Path:
    """Writes `README.md` into `folder` and returns its path."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(config, title, sections, datasets), encoding="utf-8")
    return path


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload MetaSeg model",
    ignore_patterns: list[str] | None = None,
) -> str:
    """Creates `repo_id` if needed (a name without namespace goes to the token's user) and uploads the
    folder (minus `ignore_patterns`, e.g. `["*/*"]` for top-level files only). Returns the repository URL."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True, private=private)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=getattr(repo_url, "repo_id", None) or repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=ignore_patterns,
    )
    return str(repo_url)
