"""Transcripts in the Anthropic HH style (``\\n\\nHuman: ...\\n\\nAssistant: ...``), as columns.

``split_transcripts`` turns a string column into (prompt turns, final answer); ``join_transcripts``
does the reverse; ``helpsteer_turns`` splits HelpSteer2's inline ``<extra_id_1>User`` turns.
All use PyArrow string kernels: markers are swapped for control characters and the text is
split on them, so no row is looked at in Python.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alignflow.schemas.kinds import MESSAGE, MESSAGES
from alignflow.schemas.prompts import to_messages_array

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
NEMO_TURN = "<extra_id_1>"  # HelpSteer2 (NeMo chat template) turn marker
NEMO_USER = NEMO_TURN + "User"
NEMO_ASSISTANT = NEMO_TURN + "Assistant"
_MSG = "\x1e"
_ROLE = "\x1f"


def split_last_turn(text: pa.Array) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(everything before the last ``Assistant:`` marker, the final answer, has-marker mask)."""
    parts = pc.split_pattern(text, ASSISTANT, max_splits=1, reverse=True)
    n_parts = pc.list_value_length(parts).fill_null(0).to_numpy(zero_copy_only=False)
    ok = n_parts == 2
    prefix = pc.list_element(parts, 0)
    answer = pc.if_else(pa.array(ok), pc.list_element(_pad(parts), 1), pa.scalar(None, pa.string()))
    return prefix, pc.utf8_trim_whitespace(answer), ok


def _pad(parts: pa.Array) -> pa.Array:
    """Lists of length 1 padded with "" so that element 1 exists everywhere."""
    return pc.if_else(pc.less(pc.list_value_length(parts), 2),
                      pa.scalar(["", ""], pa.list_(pa.string())), parts)


def prefix_to_messages(prefix: pa.Array) -> pa.Array:
    """``\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c`` -> [user a, assistant b, user c]."""
    return _marked_to_messages(_mark_turns(prefix, {HUMAN: "user", ASSISTANT: "assistant"}))


def turns_to_messages(text: pa.Array, markers: dict[str, str], first_role: str) -> pa.Array:
    """Text whose turns are separated by role markers -> message lists; the text before the
    first marker is a turn of ``first_role`` (HelpSteer2: ``a\\n<extra_id_1>Assistant\\nb``
    -> [user a, assistant b]). Contents are trimmed of surrounding whitespace; null reads as ""."""
    marked = _mark_turns(pc.fill_null(text.cast(pa.string()), ""), markers)
    return _marked_to_messages(pc.binary_join_element_wise(_MSG + first_role + _ROLE, marked, ""))


def helpsteer_turns(text: pa.Array) -> pa.Array:
    """A HelpSteer2 prompt -> messages: earlier turns are inline, separated by
    ``<extra_id_1>User`` / ``<extra_id_1>Assistant`` lines, the first turn is the user's.
    Prompts without a marker become one user message, untouched (as plain prompts do)."""
    text = text.cast(pa.string())
    multi = pc.fill_null(pc.match_substring(text, NEMO_TURN), False)
    split = turns_to_messages(text, {NEMO_USER: "user", NEMO_ASSISTANT: "assistant"}, "user")
    return pc.if_else(multi, split, to_messages_array(text))


def _mark_turns(text: pa.Array, markers: dict[str, str]) -> pa.Array:
    """Each marker swapped for ``\\x1e<role>\\x1f`` (control characters that do not occur in text)."""
    for marker, role in markers.items():
        text = pc.replace_substring(text, marker, _MSG + role + _ROLE)
    return text


def _marked_to_messages(marked: pa.Array) -> pa.Array:
    """Text marked by ``_mark_turns`` -> ``list<struct<role, content>>`` (kernels only)."""
    turns = pc.split_pattern(pc.fill_null(marked, ""), _MSG)  # a null text is no turn (its row is refused elsewhere)
    lengths = pc.list_value_length(turns).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(turns)
    # the text before the first marker (normally empty) is not a turn
    first = np.zeros(len(flat), dtype=bool)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    first[starts[lengths > 0]] = True
    keep = ~first
    flat = flat.filter(pa.array(keep))
    pieces = pc.split_pattern(flat, _ROLE, max_splits=1)
    role = pc.list_element(pieces, 0)
    content = pc.utf8_trim_whitespace(pc.list_element(_pad(pieces), 1))
    messages = pa.StructArray.from_arrays([role, content], fields=list(MESSAGE))
    new_lengths = np.maximum(lengths - 1, 0)
    offsets = pa.array(np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, messages, type=MESSAGES)


def split_transcripts(text: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array, np.ndarray]:
    """A transcript column -> (prompt messages, prefix text, final answer, has-marker mask)."""
    prefix, answer, ok = split_last_turn(text)
    return prefix_to_messages(prefix), prefix, answer, ok


def join_transcripts(prompt: pa.Array, response: pa.Array) -> pa.Array:
    """Prompt messages + final answer -> one HH transcript per row (the exporter's inverse)."""
    if isinstance(prompt, pa.ChunkedArray):
        prompt = prompt.chunk(0) if prompt.num_chunks == 1 else prompt.combine_chunks()
    flat = pc.list_flatten(prompt)
    role = pc.struct_field(flat, "role")
    marker = pc.if_else(pc.equal(role, "assistant"), ASSISTANT + " ", HUMAN + " ")
    turns = pc.binary_join_element_wise(marker, pc.struct_field(flat, "content"), "")
    lengths = pc.list_value_length(prompt).to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    head = pc.binary_join(pa.ListArray.from_arrays(offsets, turns), "")
    return pc.binary_join_element_wise(head, pc.cast(response, pa.string()), ASSISTANT + " ")


def continuation_text(messages: pa.Array) -> pa.Array:
    """The rest of a conversation as one response text: the first message's content, then each
    later turn after its marker (``\\n\\nHuman:`` / ``\\n\\nAssistant:``), as an HH transcript
    continues. Empty lists give null."""
    messages = messages.combine_chunks() if isinstance(messages, pa.ChunkedArray) else messages
    lengths = pc.list_value_length(messages).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(messages)
    role = pc.struct_field(flat, "role")
    marker = pc.if_else(pc.equal(role, "assistant"), ASSISTANT + " ", HUMAN + " ")
    first = np.zeros(len(flat), dtype=bool)
    first[np.concatenate([[0], np.cumsum(lengths)[:-1]])[lengths > 0]] = True
    marker = pc.if_else(pa.array(first), "", marker)
    turns = pc.binary_join_element_wise(marker, pc.fill_null(pc.struct_field(flat, "content"), ""), "")
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, turns), "")
    return pc.if_else(pa.array(lengths > 0), joined, pa.scalar(None, pa.string()))
