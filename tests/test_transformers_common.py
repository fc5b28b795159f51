"""Transformers' own common tests run against MetaSeg, as a reviewer of a new Transformers model would run them.

`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`, `ImageProcessingTestMixin` and
`PostProcessSemanticSegmentationTestMixin` come from the sdist of the installed transformers version, fetched
at test time (tests/transformers_common.py); the testers below follow Transformers' SegFormer tests. Where the
sdist cannot be had, the whole module skips with one reason; with METASEG_REQUIRE_COMMON_TESTS=1 (as .ci/run
sets) that is a failure instead. The mixins' own skips (no GPU, no SDPA/flash attention, no embeddings, slow
tests, ...) state their reasons.
"""

import unittest
import unittest.mock

import pytest
import torch
from PIL import Image
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

from helpers import tiny_config
from metaseg_hf import (
    MetaSegBackbone,
    MetaSegConfig,
    MetaSegForSemanticSegmentation,
    MetaSegImageProcessor,
    MetaSegModel,
)
from transformers_common import REQUIRE_VARIABLE, CommonTestsUnavailable, common_tests_required, load_common_tests

try:
    load_common_tests()
except CommonTestsUnavailable as error:
    UNAVAILABLE = f"Transformers' common tests are unavailable: {error}"
    if not common_tests_required():
        pytest.skip(f"{UNAVAILABLE} ({REQUIRE_VARIABLE}=1 turns this skip into a failure)", allow_module_level=True)

    def test_transformers_common_tests_are_available():
        pytest.fail(f"{REQUIRE_VARIABLE}=1 but {UNAVAILABLE}", pytrace=False)

    # Empty placeholders, so that the classes below can be defined; they are skipped.
    ModelTesterMixin, BackboneTesterMixin, ConfigTester, ImageProcessingTester = (type(f"Placeholder{i}", (), {}) for i in range(4))
    ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin = (type(f"Placeholder{i}", (), {}) for i in (4, 5))
else:
    UNAVAILABLE = None
    from transformers_common_tests.test_backbone_common import BackboneTesterMixin
    from transformers_common_tests.test_configuration_common import ConfigTester
    from transformers_common_tests.test_image_processing_common import (
        ImageProcessingTester,
        ImageProcessingTestMixin,
        PostProcessSemanticSegmentationTestMixin,
    )
    from transformers_common_tests.test_modeling_common import ModelTesterMixin

needs_common_tests = unittest.skipIf(UNAVAILABLE is not None, "Transformers' common tests are unavailable (see above)")


class MetaSegModelTester:
    """Tiny configs and inputs for the mixins (SegFormer's pattern): 4 stages, one block each, 64x64 inputs."""

    def __init__(self, parent, batch_size=2, image_size=64, num_channels=3, num_labels=3, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.num_labels = num_labels
        self.is_training = is_training
        self.hidden_sizes = list(tiny_config().hidden_sizes)
        self.num_hidden_layers = len(self.hidden_sizes)  # stages, of one block each
        self.expected_num_hidden_layers = len(self.hidden_sizes)  # one hidden state per stage, no embedding output
        self.out_features = ["stage2", "stage3", "stage4"]

    def get_config(self, **overrides):
        overrides = {"num_channels": self.num_channels, "num_labels": self.num_labels, **overrides}
        return tiny_config(**overrides)

    def prepare_config_and_inputs(self):
        pixel_values = torch.randn(self.batch_size, self.num_channels, self.image_size, self.image_size)
        labels = torch.randint(0, self.num_labels, (self.batch_size, self.image_size, self.image_size))
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class MetaSegBackboneTester(MetaSegModelTester):
    def get_config(self, **overrides):
        return super().get_config(out_features=self.out_features, **overrides)


class MetaSegConfigTester(ConfigTester):
    def create_and_test_config_common_properties(self):
        config = self.config_class(**self.inputs_dict)
        for name in ("hidden_sizes", "depths", "num_channels", "decoder_hidden_size"):
            self.parent.assertTrue(hasattr(config, name), name)


@needs_common_tests
class MetaSegModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MetaSegModel, MetaSegForSemanticSegmentation)
    pipeline_model_mapping = {"image-feature-extraction": MetaSegModel, "image-segmentation": MetaSegForSemanticSegmentation}
    test_resize_embeddings = False
    # Run `test_can_init_all_missing_weights`, which the mixin otherwise skips for files without a 2023+ copyright line.
    test_can_init_all_missing_weights_before_2023 = True
    has_attentions = False  # MetaSegModel returns none; the decoder's, of the segmentation model, are tested below

    def setUp(self):
        # The mixins tell base models (no loss) from models with a head by Transformers' own name tables, which
        # list only in-library models; list MetaSeg's as those are, for these tests only.
        patcher = unittest.mock.patch.dict(MODEL_MAPPING_NAMES, {MetaSegConfig.model_type: MetaSegModel.__name__})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.model_tester = MetaSegModelTester(self)
        self.config_tester = MetaSegConfigTester(self, config_class=MetaSegConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_semantic_segmentation_logits_loss_and_decoder_attentions(self):
        config, pixel_values, labels = self.model_tester.prepare_config_and_inputs()
        model = MetaSegForSemanticSegmentation(config).eval()
        with torch.no_grad():
            outputs = model(pixel_values, labels=labels, output_attentions=True)
        size = self.model_tester.image_size // 8  # logits at stride 8
        self.assertEqual(outputs.logits.shape, (self.model_tester.batch_size, self.model_tester.num_labels, size, size))
        self.assertGreater(outputs.loss.item(), 0.0)
        self.assertEqual(len(outputs.attentions), 3)  # Channel Reduction Attention of stages 2, 3, 4

    def test_hidden_states_output(self):
        """SegFormer's version (the mixin's expects text-model (seq_length, hidden_size) states): one (batch,
        channels, height, width) map per stage at strides 4, 8, 16, 32, asked for by argument or by config."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        size = self.model_tester.image_size
        expected = [
            (self.model_tester.batch_size, channels, size // stride, size // stride)
            for channels, stride in zip(self.model_tester.hidden_sizes, (4, 8, 16, 32))
        ]
        for model_class in self.all_model_classes:
            for by_config in (False, True):
                config.output_hidden_states = by_config
                inputs = {**inputs_dict, **({} if by_config else {"output_hidden_states": True})}
                model = model_class(config).eval()
                with torch.no_grad():
                    hidden_states = model(**inputs).hidden_states
                self.assertEqual([tuple(state.shape) for state in hidden_states], expected)

    @unittest.skip("MetaSeg always has 4 stages (the decoder reads stages 2-4); here each has one block")
    def test_num_layers_is_small(self):
        pass

    @unittest.skip("MetaSeg has no input embeddings (a vision model, as SegFormer)")
    def test_inputs_embeds(self):
        pass

    @unittest.skip("MetaSeg has no input embeddings (a vision model, as SegFormer)")
    def test_model_get_set_embeddings(self):
        pass


@needs_common_tests
class MetaSegBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (MetaSegBackbone,)
    config_class = MetaSegConfig
    has_attentions = False

    def setUp(self):
        self.model_tester = MetaSegBackboneTester(self)

    @unittest.skip(
        "MetaSeg's stage_names are stage1..stage4, without Transformers' usual 'stem' entry: out_indices count "
        "from the first stage (0 = stage1), as saved configs and MetaSegForSemanticSegmentation rely on"
    )
    def test_config(self):
        pass


class MetaSegImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"shortest_edge": 64, "longest_edge": 128})
        kwargs.setdefault("num_labels", 5)
        super().__init__(parent, batch_size=3, min_resolution=30, max_resolution=96, **kwargs)

    def _get_image_processing_classes(self):
        # Transformers finds its own models' processors by the test file's folder name; MetaSeg's are those
        # registered with AutoImageProcessor (one per backend), which is what this checks.
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

        return dict(IMAGE_PROCESSOR_MAPPING[MetaSegConfig])

    def expected_output_image_shape(self, images):
        processor = MetaSegImageProcessor(size=self.size)
        sizes = [processor.get_processed_size(*image_size(image)) for image in images]
        return self.num_channels, max(height for height, _ in sizes), max(width for _, width in sizes)

    def prepare_post_process_semantic_segmentation_inputs(self):
        from transformers.modeling_outputs import SemanticSegmenterOutput

        logits = torch.randn(self.batch_size, self.num_labels, 16, 24)
        # The logits of a 128x192 input (stride 8). Without target sizes, maps come at the logits' size (as
        # SegFormer's); with them, `input_sizes` says which input the logits are of (the mixin's random target
        # sizes are not this processor's resize of any input size).
        inputs = {"outputs": SemanticSegmenterOutput(logits=logits), "input_sizes": [(128, 192)] * self.batch_size}
        return inputs, {"num_labels": self.num_labels, "height": 16, "width": 24}


def image_size(image):
    """(height, width) of a PIL image, an (H, W, C) array or a (C, H, W) tensor, as the mixins make them."""
    if isinstance(image, Image.Image):
        width, height = image.size
        return height, width
    if isinstance(image, torch.Tensor):
        return tuple(image.shape[1:3])
    return tuple(image.shape[:2])


@needs_common_tests
class MetaSegImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = MetaSegImageProcessingTester

