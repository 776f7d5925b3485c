"""QuaRot's fold: the residual stream of an RMSNorm pre-norm decoder rotated once, in its weights.

In a model whose blocks are pre-norm with RMSNorm (LLaMA, Mistral, Qwen2, Phi-3, Gemma: found by
structure, `models.facts`), the residual stream h can be carried as h·R (R: the Hadamard rotation
of the hidden width, quant/hadamard.py) without changing the model's output:

- RMSNorm(h·R) = RMSNorm(h)·R once the norm's scale g is moved into the linears that read it (the
  RMS is rotation-invariant; diag(g) does not commute with R, so g becomes 1);
- each linear reading a norm's output (q/k/v, gate/up, the LM head) gets W·diag(g)·R;
- each linear writing to the stream (the attention's and the MLP's output projections) gets Rᵀ·W
  and bias b·R; the input embedding E·R (an LM head tied to it is untied first).

The linears reading the stream then quantize x·R with no rotation at run time: only the output
projections' inputs (the attention context, the MLP's hidden activations), which are not the
stream, still need the online rotation (`FoldReport.online`). Run it on the fp model, before
`qk.quantize_`:

    report = fold_rotation(model, example)
    qk.quantize_(model, qk.W4A4(rotate="hadamard"), filter_fn=lambda module, name: name in report.online)
    qk.quantize_(model, qk.W4A4())   # the rest: their input is the rotated stream already

The fold is kept only if the model's output on `example` is unchanged (a norm on a branch's
output, as in Gemma 2, breaks the algebra); otherwise every weight is restored and a ValueError
says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..models.batches import model_output, run_model
from ..models.blocks import find_blocks
from ..models.facts import describe_block, example_input, run_hooked
from ..nn.module_kinds import is_norm, norm_kind_of, norm_weight, read_norm
from ..quant.hadamard import check_rotatable, rotate

EQUIVALENCE_TOLERANCE = 1e-3  # relative to the output's max: fp32 re-association passes, a broken fold does not


@dataclasses.dataclass
class FoldReport:
    blocks: List[str]  # the blocks whose stream is rotated (all of the model's)
    online: List[str]  # linears whose input is not the stream: the ones to quantize with rotate="hadamard"
    max_error: float  # the folded model's output against the original's, relative to its max


def _final_norm(model: nn.Module, head: nn.Module, batch: Any, block_modules: set) -> nn.Module:
    """The norm outside the blocks whose output the LM head reads (matched by storage: the model
    may hand the head a view of it, as Hugging Face's `logits_to_keep` slice does)."""
    outputs: Dict[int, nn.Module] = {}
    head_input: List[torch.Tensor] = []

    def record_norm(module, args, output):
        outputs.setdefault(output.untyped_storage().data_ptr(), module)

    def record_head(module, args, output):
        head_input.append(args[0])

    handles = [module.register_forward_hook(record_norm)
               for module in model.modules() if is_norm(module) and module not in block_modules]
    handles.append(head.register_forward_hook(record_head))
    run_hooked(model, batch, handles)
    norm = outputs.get(head_input[0].untyped_storage().data_ptr()) if head_input else None
    if norm is None:
        raise ValueError("the LM head does not read a final norm's output: the stream cannot be un-rotated before it")
    return norm


def _check_linear(name: str, module: nn.Module) -> None:
    if type(module) is not nn.Linear:
        raise ValueError(f"{name!r} is a {type(module).__name__}, not an nn.Linear: fold the rotation before "
                         "qk.quantize_ (on the fp model)")


@torch.no_grad()
def fold_rotation(model: nn.Module, example: Optional[Any] = None) -> FoldReport:
    """Rotates the residual stream of an RMSNorm pre-norm decoder with an LM head (in place; see
    the module docstring). `example`: one input batch (token ids from the config when omitted)
    on which the fold is checked. ValueError, with every weight as it was, when the model is not
    such a decoder or its output changes."""
    example = example if example is not None else example_input(model)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embedding, nn.Embedding) or head is None:
        raise ValueError("the rotation folds into a decoder with an input embedding and an LM head "
                         "(get_input_embeddings / get_output_embeddings)")
    _check_linear("the LM head", head)
    width = embedding.weight.shape[1]
    check_rotatable(width, "the hidden width")
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError("no blocks found: the model has no repeated layers holding linears")
    block_modules = {module for _, block in blocks for module in block.modules()}
    final_norm = _final_norm(model, head, example, block_modules)
    groups = []  # (norm, readers, writers) with full names
    for block_name, block in blocks:
        facts, _ = describe_block(model, block_name, block, example)
        if facts.norm_kind != "rmsnorm" or facts.norm_position != "pre":
            raise ValueError(f"block {block_name!r} is {facts.norm_position}-norm with {facts.norm_kind}: the fold "
                             "needs pre-norm RMSNorm blocks (the RMS is rotation-invariant; a LayerNorm's mean is not)")
        others = [name for name, module in block.named_modules() if is_norm(module)
                  and name not in (facts.attention_norm, facts.mlp_norm)
                  and getattr(module, "weight", None) is not None and module.weight.shape[0] == width]
        if others:  # Gemma 2's norms on the branch outputs: their scale cannot move past the residual add
            raise ValueError(f"block {block_name!r} has norms of the hidden width besides its two pre-norms "
                             f"({', '.join(others)}): their scale has no linear after them to move into")
        part = lambda name: f"{block_name}.{name}"  # noqa: E731
        groups.append((part(facts.attention_norm), [part(n) for n in facts.attention_inputs],
                       [part(facts.attention_output)]))
        groups.append((part(facts.mlp_norm), [part(n) for n in facts.mlp_inputs], [part(facts.mlp_output)]))
    names = {module: name for name, module in model.named_modules()}
    groups.append((names[final_norm], [names[head]], []))
    for _, readers, writers in groups:
        for name in readers + writers:
            _check_linear(name, model.get_submodule(name))

    before = model_output(run_model(model, example)).float()
    touched = {name: model.get_submodule(name) for _, readers, writers in groups for name in readers + writers}
    touched.update({norm: model.get_submodule(norm) for norm, _, _ in groups})
    saved = {name: {key: value.clone() for key, value in module.state_dict().items()} for name, module in touched.items()}
    saved_embedding = embedding.weight.detach().clone()
    tied = head.weight is embedding.weight
    try:
        # x·R by `rotate` (its fast products in fp32 on the weights' device, as QuantLinear rotates
        # its stored weight): W·diag(g)·R = rotate(W·g), Rᵀ·W = rotate(Wᵀ)ᵀ.
        if tied:
            head.weight = nn.Parameter(head.weight.detach().clone())
        embedding.weight.copy_(rotate(embedding.weight))
        for norm_name, readers, writers in groups:
            norm = model.get_submodule(norm_name)
            if norm_kind_of(norm) != "rmsnorm":
                raise ValueError(f"{norm_name!r} ({type(norm).__name__}) is not an RMSNorm")
            read_norm(norm)  # x̂·w or x̂·(1 + w)
            scale = norm_weight(norm).float()
            for name in readers:
                linear = model.get_submodule(name)
                linear.weight.copy_(rotate(linear.weight.float() * scale))
            for name in writers:
                linear = model.get_submodule(name)
                linear.weight.copy_(rotate(linear.weight.t()).t())
                if linear.bias is not None:
                    linear.bias.copy_(rotate(linear.bias))
            norm.weight.fill_(1.0 - norm.__dict__.get("_qla_weight_offset", 0.0))
        after = model_output(run_model(model, example)).float()
        error = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
        if not error <= EQUIVALENCE_TOLERANCE:
            raise ValueError(f"the fold changed the model's output (relative error {error:.3g}): its blocks are not "
                             "plain pre-norm RMSNorm blocks (a norm on a branch's output?)")
    except Exception:
        embedding.weight.copy_(saved_embedding)
        if tied:
            head.weight = embedding.weight
        for name, module in touched.items():
            module.load_state_dict(saved[name])
        raise
    if tied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # saved and loaded as two matrices from now on
    online = [writer for _, _, writers in groups for writer in writers]
    return FoldReport([name for name, _ in blocks], online, error)
