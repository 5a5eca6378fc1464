"""Domain errors: what went wrong, in terms of images, models and data, never HTTP.

service/errors.py maps each to a status code; command-line ``main()`` functions turn them
into one-line messages and exit codes. Library code raises, it never exits.
"""

from __future__ import annotations


class ConvserveError(Exception):
    """Base of every error core raises on purpose."""


class InvalidImage(ConvserveError):
    """The bytes are not an image Pillow can decode (empty, unknown, truncated, corrupt)."""


class ImageTooLarge(ConvserveError):
    """The image is over the byte or pixel limit (checked before any pixel is decoded)."""


class InvalidVideo(ConvserveError):
    """The bytes are not a video convserve reads (MP4 or WebM with a decodable video stream)."""


class VideoTooLarge(ConvserveError):
    """A video's frames are over the pixel limit, or it holds more frames than a request may decode."""


class InvalidOption(ConvserveError, ValueError):
    """A task option (top_k, score_threshold, ...) has the wrong type or is out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidModel(ConvserveError):
    """A file cannot be served: not a loadable ONNX graph, or an invalid contract."""


class ContractError(InvalidModel, ValueError):
    """A model's contract document is missing, malformed or disagrees with its graph."""


class RepositoryError(ConvserveError):
    """The model repository cannot be served; the message names the path."""


class ModelNotFound(ConvserveError):
    """No loaded model has the requested name or version."""


class WrongTask(ConvserveError):
    """The requested model exists but serves another task."""


class DatasetError(ConvserveError, ValueError):
    """A dataset directory is malformed; the message names the offending file or folder."""


class DeviceUnavailable(ConvserveError, RuntimeError):
    """An explicit CUDA request could not be met."""


class ConfigError(ConvserveError, ValueError):
    """A setting (environment variable) has an invalid value; the message names it."""


class GalleryError(ConvserveError):
    """A gallery of embeddings (service.galleries) cannot do what was asked."""


class GalleryNotFound(GalleryError, LookupError):
    """No gallery has this name."""


class GalleryExists(GalleryError):
    """A gallery of this name exists already."""


class ItemNotFound(GalleryError, LookupError):
    """The gallery holds no item of this id."""


class GalleryConflict(GalleryError):
    """The gallery cannot take this request as it stands: another model version's vectors, or full."""


class InvalidGalleryRequest(GalleryError, ValueError):
    """A gallery name, item id, metadata, vector or search parameter is malformed or out of range."""


class DimensionMismatch(InvalidGalleryRequest):
    """A vector's length is not the gallery's dimension."""


class InvalidVector(InvalidGalleryRequest):
    """A vector holds NaN or infinity, or is all zeros."""
