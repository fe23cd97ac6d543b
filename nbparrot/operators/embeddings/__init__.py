"""Embeddings over a DataFrame's rows: ``embed``, ``search`` and ``sim_join`` (``POST /v1/embeddings``).

``embed(df, "text")`` (a column, its text as is) or ``embed(df, "{title}: {body}")`` (a template)
returns a ``Run`` like ``map`` does: at once in a notebook (live panel, Cancel, ``await run``), to
completion in a script. Its result is a Series of float32 numpy vectors on the frame's index (None
where a row has none); ``run.matrix()`` gives them as one (rows x dims) float32 array, NaN rows
where there is no vector, and ``nbparrot.operators.similarity.as_matrix(series.dropna())`` makes one
from any such Series.

How a run goes (``EmbedEngine``, an ``Engine`` whose unit on the wire is a *pack* of rows):

- **Planning**, before any request, in slices as for ``map``: each row's text is rendered once,
  its tokens estimated (``ceil(utf-8 bytes / 4)``), and its cache key made from the base URL, the
  model, ``dimensions`` and the text alone, so a frame's vectors are found again by any later call
  (``embed``, ``search``, ``sim_join``, another frame holding the same texts). A missing value is
  skipped (``on_missing``), an empty text or one over the 8,192-token input limit fails its row
  there, with nothing sent. Then rows with the same text are folded together: each distinct text
  is sent once and its vector given to every row that has it.
- **Packing** happens as requests are dispatched: rows are taken from the head of the queue into a
  pack of at most ``per_request`` inputs (2,048, OpenAI's limit) and 300,000 estimated tokens (and
  never more than the tokens-per-minute limit, once one is known). A request's pacing cost is the
  sum of its inputs' estimated tokens. The first pack goes alone, as ``map``'s first row does:
  a chat model, a bad key or an unknown model costs one request and stops the run with the
  endpoint's error in one line.
- **Answers** come base64-encoded (``encoding_format="base64"``, float32 little-endian: a quarter
  of the JSON floats' decoding work), are written into one preallocated float32 matrix and put in
  the cache as the base64 text. ``usage.prompt_tokens`` is shared out over the pack's rows in
  proportion to their estimates (``meta=True`` shows it per row). A pack refused for its size
  (tokens, or an answer over the size cap) is split in two and both halves sent, down to the one
  row at fault, which fails alone; 429s, 5xx and network errors retry the pack with backoff.
- **Budget**: ``max_cost`` books each pack's most-possible cost before it goes; a pack that does
  not fit is cut to the rows that do, then the run stops.
- Cancel keeps every vector that landed (and the cache has them): a rerun sends only the rest.

``search`` and ``sim_join`` embed through the same run (one panel: the frame's rows plus the
query, or both sides of the join), then rank by cosine similarity with
``nbparrot.operators.similarity.nearest`` (chunked: the full similarity matrix is never built).
``search`` also keeps the last few frames' unit vectors in memory (``MEMO_ENTRIES``, ``MEMO_BYTES``),
checked against the frame's columns on each call (pandas' copy-on-write makes that a cheap
comparison), so a second query on an unchanged frame costs one embedding and one matrix product.

The Batch API (``mode="batch"``) is not offered for embeddings yet: a ``ConfigError`` says so.
"""


from .engine import DEFAULT_MODEL, EmbedEngine, text_key
from .inputs import Inputs
from .join import sim_join
from .query import clear_memo, search
from .vectors import EmbedRun, embed

__all__ = ["embed", "search", "sim_join", "EmbedEngine", "EmbedRun", "Inputs", "DEFAULT_MODEL", "clear_memo", "text_key"]
