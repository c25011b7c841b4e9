"""Tokenizer: a thin wrapper over a Hugging Face ``tokenizers.Tokenizer`` (``tokenizer.json``).

xLSTM 7B was trained with every document starting with id 0 (``<|endoftext|>``), so ``encode``
prepends that BOS id by default. The hub ``tokenizer.json`` may or may not add it through its
post-processor; we always encode with ``add_special_tokens=False`` and add BOS ourselves, so it is
never added twice.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

__all__ = ["Tokenizer"]

_DEFAULT_EOS_TOKEN = "<|endoftext|>"


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON tokenizer config: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path}: not a valid tokenizer.json: {e}") from e


def _chat_template(config: dict[str, Any], path: Path) -> str | None:
    """``chat_template`` is a string, or a list of ``{"name", "template"}`` (keep ``default``)."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{path}: chat_template must be a string or a list holding a 'default' template")


class Tokenizer:
    """Text <-> token ids for xLSTM models.

    Attributes:
        bos_token_id / bos_token: the id (default 0) prepended by ``encode`` when ``add_bos``.
        eos_token_id / eos_token: the end-of-sequence id (from tokenizer_config.json's
            ``eos_token`` if given, else ``<|endoftext|>`` if in the vocabulary, else BOS).
        add_bos: default for ``encode(add_bos=None)``.
        chat_template: the Jinja chat template from tokenizer_config.json, or None.
        path: the tokenizer.json this was loaded from, or None.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int = 0,
        eos_token_id: int | None = None,
        add_bos: bool = True,
        chat_template: str | None = None,
        path: Path | None = None,
    ) -> None:
        self._tok = tokenizer
        self.path = path
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        where = f" ({path})" if path is not None else ""
        size = self.vocab_size
        if not isinstance(bos_token_id, int) or not 0 <= bos_token_id < size:
            raise ValueError(f"bos_token_id must be an int in [0, {size}), got {bos_token_id!r}{where}")
        if eos_token_id is None:
            default_eos = tokenizer.token_to_id(_DEFAULT_EOS_TOKEN)
            eos_token_id = bos_token_id if default_eos is None else default_eos
        if not isinstance(eos_token_id, int) or not 0 <= eos_token_id < size:
            raise ValueError(f"eos_token_id must be an int in [0, {size}), got {eos_token_id!r}{where}")
        self.bos_token_id: int = bos_token_id
        self.eos_token_id: int = eos_token_id
        self.bos_token: str | None = tokenizer.id_to_token(bos_token_id)
        self.eos_token: str | None = tokenizer.id_to_token(eos_token_id)

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        bos_token_id: int = 0,
        eos_token_id: int | None = None,
        add_bos: bool = True,
        chat_template: str | None = None,
    ) -> Tokenizer:
        """Load a ``tokenizer.json`` file. Raises FileNotFoundError / ValueError naming the path."""
        path = Path(path)
        return cls(
            _load_backend(path),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            add_bos=add_bos,
            chat_template=chat_template,
            path=path,
        )

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        bos_token_id: int = 0,
        add_bos: bool = True,
        *,
        eos_token_id: int | None = None,
    ) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and ``tokenizer_config.json`` (optional) from a model dir.

        tokenizer_config.json supplies ``chat_template`` and, unless ``eos_token_id`` is given,
        the ``eos_token``.
        """
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {root}")
        file = root / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {root} (expected {file})")
        backend = _load_backend(file)
        config_path = root / "tokenizer_config.json"
        config = _read_tokenizer_config(config_path)
        template = _chat_template(config, config_path)
        if eos_token_id is None:
            eos_text = _token_content(config.get("eos_token"))
            if eos_text is not None:
                eos_token_id = backend.token_to_id(eos_text)
                if eos_token_id is None:
                    raise ValueError(f"{config_path}: eos_token {eos_text!r} is not in the vocabulary of {file}")
        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            add_bos=add_bos,
            chat_template=template,
            path=file,
        )

    # ------------------------------------------------------------- conversion
    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if (self.add_bos if add_bos is None else add_bos) and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; BOS is prepended when ``add_bos`` (default ``self.add_bos``)
        unless the ids already start with it (e.g. the text begins with ``<|endoftext|>``)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._with_bos(list(self._tok.encode(text, add_special_tokens=False).ids), add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """``encode`` over many texts (parallel in the Rust library)."""
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(list(e.ids), add_bos) for e in encs]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 byte runs become U+FFFD)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def add_placeholder_tokens(self, vocab_size: int) -> int:
        """Makes every id below `vocab_size` decode to text: each id i past the current vocabulary
        becomes the added token ``" t{i}"``. Returns how many were added.

        For a random-weight preset whose vocabulary is larger than the demo tokenizer it comes with
        (the 7B's 50,304 ids against 1,024). Without them almost every generated id would decode to
        nothing, so a served stream would send almost no chunks, where a real checkpoint's tokenizer
        sends about one per token: the server's streaming work would go unmeasured. Text that
        contains such a word encodes to its id, like any added token.
        """
        have = self.vocab_size
        if not isinstance(vocab_size, int) or vocab_size < have:
            raise ValueError(f"vocab_size must be an int >= the tokenizer's {have} ids, got {vocab_size!r}")
        words = [tokenizers.AddedToken(f" t{i}", normalized=False) for i in range(have, vocab_size)]
        added = self._tok.add_tokens(words)
        if self.vocab_size != vocab_size:  # a placeholder that was already a token would shift every later id
            raise ValueError(f"placeholder tokens clash with the vocabulary: {self.vocab_size} ids, wanted {vocab_size}")
        return added

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(int(token_id))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"bos_token_id={self.bos_token_id}, eos_token_id={self.eos_token_id}, add_bos={self.add_bos})"
        )
