"""`evaluate` module: mean IoU for semantic segmentation, computed by metaseg-hf's streaming metric.

Load it offline from the installed package (no Hub access needed):

```python
>>> import evaluate
>>> from metaseg_hf.metrics import EVALUATE_METRIC_PATH
>>> metric = evaluate.load(str(EVALUATE_METRIC_PATH))
>>> results = metric.compute(predictions=predictions, references=labels, num_labels=150, ignore_index=255)
```
"""

import datasets
import evaluate
import numpy as np

from metaseg_hf.metrics import StreamingMeanIoU

_DESCRIPTION = """
Mean Intersection-over-Union of semantic segmentation maps, as MMSegmentation's evaluation (and the
`mean_iou` metric) compute it: pixels labelled with the ignore index are skipped; per class,
IoU = intersection / union and accuracy = intersection / label pixels over the whole set of maps;
classes absent from both predictions and labels are NaN and left out of the means. Computed from one
confusion matrix with `torch.bincount` (metaseg_hf.metrics.StreamingMeanIoU).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D integer arrays): predicted class ids, one (H, W) map per image.
    references (`list` of 2-D integer arrays): labels, same shapes (class ids or `ignore_index`).
    num_labels (`int`): number of classes.
    ignore_index (`int`, defaults to 255): label value of pixels to skip.
    reduce_labels (`bool`, defaults to `False`): ADE20K-style labels (0 -> ignored, others minus 1).
    id2label (`dict`, *optional*): class names for the `per_class` rows.
    nan_to_num (`float`, *optional*): replace NaN of absent classes in the per-category arrays.
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats), `per_category_iou`,
    `per_category_accuracy` (numpy arrays, NaN for absent classes), `per_class` (list of dicts with
    `id`, `name`, `iou`, `accuracy`, `label_pixels`, `predicted_pixels`).
Example:
    >>> metric = evaluate.load("path/to/metaseg_mean_iou")
    >>> metric.compute(predictions=[np.array([[0, 1]])], references=[np.array([[0, 255]])], num_labels=2)["mean_iou"]
    1.0
"""

_CITATION = """
@inproceedings{kang2024metaseg,
  title={MetaSeg: MetaFormer-based Global Contexts-aware Network for Efficient Semantic Segmentation},
  author={Kang, Beoungwoo and Moon, Seunghun and Cho, Yubin and Yu, Hyunwoo and Kang, Suk-Ju},
  booktitle={WACV},
  year={2024}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MetasegMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=["https://github.com/hyunwoo137/MetaSeg"],
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255, reduce_labels=False, id2label=None,
                 nan_to_num=None):
        metric = StreamingMeanIoU(num_labels, ignore_index=ignore_index, id2label=id2label, reduce_labels=reduce_labels)
        for prediction, reference in zip(predictions, references):
            metric.update(np.asarray(prediction, dtype=np.int64), np.asarray(reference, dtype=np.int64))
        results = metric.compute()
        if nan_to_num is not None:
            for key in ("per_category_iou", "per_category_accuracy"):
                results[key] = np.nan_to_num(results[key], nan=nan_to_num)
        return results
