"""`pipeline("image-segmentation")` over batches of photos of different sizes.

Transformers' image-segmentation pipeline stacks the `pixel_values` of a batch with `torch.cat`, which
fails for MetaSeg's keep-ratio resize (a 500x375 and a 375x500 photo give 512x704 and 704x512 inputs).
Padding would be no answer: Channel Reduction Attention pools keys and values over the whole canvas, so
padding changes the logits of the real pixels. `MetaSegImageSegmentationPipeline` keeps each photo's
`pixel_values` apart in a batch and runs the network once per processed size (photos of the same size
together), so that a batch returns what one-at-a-time calls return. For other models it is Transformers'
pipeline unchanged. Importing `metaseg_hf` makes it the implementation of the "image-segmentation" task.
"""

import torch
from torch.utils.data import DataLoader
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.image_segmentation import ImageSegmentationPipeline


def forward_by_size(model, pixel_values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each (1, C, H, W) input's logits (1, num_labels, h, w): one forward per distinct input size, the
    inputs of that size batched together (no padding), in the order given."""
    groups = {}
    for index, tensor in enumerate(pixel_values):
        groups.setdefault(tuple(tensor.shape[-2:]), []).append(index)
    logits = [None] * len(pixel_values)
    for indices in groups.values():
        batch_logits = model(pixel_values=torch.cat([pixel_values[index] for index in indices])).logits
        for index, image_logits in zip(indices, batch_logits):
            logits[index] = image_logits[None]
    return logits


def _keep_images_apart(items: list[dict]) -> dict:
    """The batch collation for MetaSeg: lists of the items' tensors, not one stacked tensor."""
    return {key: [item[key] for item in items] for key in items[0]}


class MetaSegImageSegmentationPipeline(ImageSegmentationPipeline):
    """Transformers' `ImageSegmentationPipeline`; with a MetaSeg model, `batch_size > 1` runs photos of
    different sizes without padding (see the module docstring): each result equals the one-photo call's."""

    def _is_metaseg(self) -> bool:
        return getattr(self.model.config, "model_type", None) == "metaseg"

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        iterator = super().get_iterator(
            inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
        )
        if self._is_metaseg() and batch_size > 1:
            dataloader = getattr(getattr(iterator, "loader", None), "loader", None)  # under the model iterator
            if not isinstance(dataloader, DataLoader):
                raise RuntimeError(
                    "MetaSegImageSegmentationPipeline does not know this Transformers version's pipeline iterator; "
                    "photos of different sizes cannot be batched: call the pipeline with batch_size=1."
                )
            dataloader.collate_fn = _keep_images_apart
        return iterator

    def _forward(self, model_inputs):
        if not (self._is_metaseg() and isinstance(model_inputs["pixel_values"], list)):
            return super()._forward(model_inputs)
        # A batch kept apart: per-image logits of their own sizes; the pipeline unbatches the lists by index.
        logits = forward_by_size(self.model, model_inputs["pixel_values"])
        return {"logits": [image_logits[0] for image_logits in logits], "target_size": model_inputs["target_size"]}


def register() -> None:
    """Makes `MetaSegImageSegmentationPipeline` the implementation of the "image-segmentation" task (the task's
    model classes and default model are kept)."""
    PIPELINE_REGISTRY.supported_tasks["image-segmentation"]["impl"] = MetaSegImageSegmentationPipeline


__all__ = ["MetaSegImageSegmentationPipeline", "forward_by_size", "register"]
