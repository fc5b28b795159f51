"""MetaSeg (WACV 2024) for Hugging Face Transformers.

Importing the package registers MetaSeg with the Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForSemanticSegmentation`, `AutoBackbone`, `AutoImageProcessor`).
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto import modeling_auto

from . import pipeline_metaseg
from .configuration_metaseg import MetaSegConfig
from .image_processing_metaseg import BACKENDS, MetaSegImageProcessor
from .modeling_metaseg import (
    MetaSegBackbone,
    MetaSegForSemanticSegmentation,
    MetaSegModel,
    MetaSegPreTrainedModel,
    minimum_input_size,
)
from .presets import VARIANTS

__version__ = "0.1.0"

AutoConfig.register(MetaSegConfig.model_type, MetaSegConfig, exist_ok=True)
AutoModel.register(MetaSegConfig, MetaSegModel, exist_ok=True)
AutoModelForSemanticSegmentation.register(MetaSegConfig, MetaSegForSemanticSegmentation, exist_ok=True)
AutoBackbone.register(MetaSegConfig, MetaSegBackbone, exist_ok=True)
AutoImageProcessor.register(
    MetaSegConfig, image_processor_classes=dict.fromkeys(BACKENDS, MetaSegImageProcessor), exist_ok=True
)

# save_pretrained writes the code files and auto_map entries a Hub repo needs for trust_remote_code.
MetaSegConfig.register_for_auto_class("AutoConfig")
MetaSegModel.register_for_auto_class("AutoModel")
MetaSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
MetaSegBackbone.register_for_auto_class("AutoBackbone")
MetaSegImageProcessor.register_for_auto_class("AutoImageProcessor")


# pipeline("image-segmentation") with batch_size > 1 over photos of different sizes (pipeline_metaseg.py).
pipeline_metaseg.register()

# Transformers behaviour: pipeline("image-segmentation") checks the model class against the *names* of
# Transformers' own segmentation models, not registered ones, and logs "not supported" otherwise.
modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(
    MetaSegConfig.model_type, MetaSegForSemanticSegmentation.__name__
)

__all__ = [
    "VARIANTS",
    "MetaSegBackbone",
    "MetaSegConfig",
    "MetaSegForSemanticSegmentation",
    "MetaSegImageProcessor",
    "MetaSegModel",
    "MetaSegPreTrainedModel",
    "minimum_input_size",
]
