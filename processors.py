"""A family's processor, loaded as a download is: the class its files name, padding on the left;
images only (its video processor left out) where torchvision is missing; never a processor that
drops images (a bare tokenizer, or one without an image processor) stops in one line instead.
"""
import json
import os


def load_processor(name_or_path, family=None, **kwargs):
    """The checkpoint's processor, padding on the left (the official evaluation pads left).
    Without torchvision, processors with a video processor (Qwen2/2.5/3-VL, LLaVA-OneVision,
    SmolVLM, InternVL) are built without it (`images_only`); one that cannot take images stops."""
    import transformers
    from transformers import AutoProcessor
    whose = f"the {family or 'model'}'s processor at {name_or_path}"
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except ImportError as error:
        if not about_torchvision(error):
            raise
        try:  # remote code (Phi-3.5-V) has no class here, and SmolVLM's module imports it in 4.x
            cls = getattr(transformers, processor_class_name(name_or_path))
            if "video_processor" not in attributes_of(cls):
                raise error
            processor = images_only(cls).from_pretrained(name_or_path, **kwargs)
        except (ImportError, AttributeError):
            raise SystemExit(f"{whose} needs torchvision: pip install torchvision") from None
    except OSError as error:  # e.g. no image processor config next to the model
        raise SystemExit(f"cannot load {whose}: {str(error).strip().splitlines()[0]}") from None
    if not takes_images(processor):
        name = processor_class_name(name_or_path)
        why = ("written by an earlier export.py: export the run again" if name.endswith(
            "ImagesOnly") else f"which transformers {transformers.__version__} does not have")
        raise SystemExit(f"{whose} cannot take images (AutoProcessor gives a "
                         f"{type(processor).__name__}): its files name {name!r}, {why}")
    getattr(processor, "tokenizer", processor).padding_side = "left"
    return processor


def takes_images(processor):
    """False for a tokenizer, or a processor without an image processor."""
    from transformers import PreTrainedTokenizerBase, ProcessorMixin
    return not (isinstance(processor, PreTrainedTokenizerBase) or isinstance(
        processor, ProcessorMixin) and getattr(processor, "image_processor", None) is None)


def about_torchvision(error):
    """Whether an import failed for want of torchvision, here or in what it imported."""
    while error is not None and "torchvision" not in str(error).lower():
        error = error.__cause__ or error.__context__
    return error is not None


def attributes_of(processor_class):
    """Sub-processors of a processor class: transformers 5 `get_attributes()`, 4.x `attributes`."""
    get = getattr(processor_class, "get_attributes", None)
    return list(get() if get else getattr(processor_class, "attributes", []))


def processor_class_name(name_or_path):
    """The processor class a checkpoint names, where AutoProcessor looks; else its model type's."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file
    configs = [cached_file(name_or_path, f"{name}.json",
                           _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
               for name in ("processor_config", "preprocessor_config",
                            "video_preprocessor_config", "tokenizer_config", "config")]
    configs = [json.load(open(path, encoding="utf-8")) if path else {} for path in configs]
    return next((c["processor_class"] for c in configs if c.get("processor_class")),
                PROCESSOR_MAPPING_NAMES.get(configs[-1].get("model_type"), ""))


def images_only(processor_class):
    """`processor_class` without its video processor (which needs torchvision), under the same
    name: its files name the real class, so AutoProcessor builds the whole processor where
    torchvision is. It saves the video processor config it was loaded with (else the image
    processor's, which AutoVideoProcessor also reads from older downloads) where the real class
    would: in processor_config.json (transformers 5), else video_preprocessor_config.json."""
    class ImagesOnly(processor_class):
        attributes = [a for a in attributes_of(processor_class) if a != "video_processor"]
        video_processor_config = None

        @classmethod
        def get_attributes(cls):  # transformers 5; 4.x reads `attributes`
            return cls.attributes

        @classmethod
        def from_pretrained(cls, name_or_path, **kwargs):
            from transformers.video_processing_utils import BaseVideoProcessor
            processor = super().from_pretrained(name_or_path, **kwargs)
            try:  # a download has one
                processor.video_processor_config, _ = \
                    BaseVideoProcessor.get_video_processor_dict(name_or_path)
            except OSError:
                pass
            return processor

        @classmethod
        def from_dict(cls, processor_dict, **kwargs):  # transformers 5
            return super().from_dict({**processor_dict, "video_processor": None}, **kwargs)

        @classmethod
        def from_args_and_dict(cls, args, processor_dict, **kwargs):  # transformers 4.x
            return super().from_args_and_dict(args, {**processor_dict, "video_processor": None},
                                              **kwargs)

        def save_pretrained(self, folder, **kwargs):
            files = super().save_pretrained(folder, **kwargs)
            video = {**(self.video_processor_config or self.image_processor.to_dict()),
                     "processor_class": self.__class__.__name__}
            path = os.path.join(folder, "processor_config.json")
            config = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
            if "image_processor" in config:
                config["video_processor"] = video
            else:
                path, config = os.path.join(folder, "video_preprocessor_config.json"), video
            with open(path, "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            return files
    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_class.__name__
    return ImagesOnly
