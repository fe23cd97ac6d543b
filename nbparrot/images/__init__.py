"""Images and documents in a column: recognised, costed, sent lean, and shown beside their answers.

- :mod:`.parts`: ``MediaPart``, a row's image or PDF from its source (path, URL, bytes, PIL image,
  numpy array) to the content part sent; ``MediaOptions`` (``images=``, ``detail=``, ``max_image_px=``).
- :mod:`.header`: format and size from the first bytes, without decoding (shared with the server).
- :mod:`.cost`: image tokens by OpenAI's tile / patch rules.
- :mod:`.thumbs`: ``thumbnail_html``, the small inline picture in the preview and the comparison.

Pillow is imported only when an image must be decoded (a PIL image or array, a format other than
PNG/JPEG/GIF/WebP, a downscale, a thumbnail): ``pip install 'nbparrot[images]'``.
"""

from __future__ import annotations

from .cost import image_tokens, pdf_tokens
from .parts import MediaError, MediaOptions, MediaPart, expand, is_media, media_options, parts_of
from .thumbs import thumbnail_html

__all__ = ["MediaError", "MediaOptions", "MediaPart", "expand", "image_tokens", "is_media", "media_options",
           "parts_of", "pdf_tokens", "thumbnail_html"]
