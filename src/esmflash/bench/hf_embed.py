"""The plain Hugging Face job esmflash's CLI is compared with: mean ESM-2 embeddings of a FASTA file.

    python3 -m esmflash.bench.hf_embed IN.fasta OUT.npz --model esm2_t33_650M_UR50D --precision fp16

What a user would write with transformers: EsmModel with SDPA attention in the given precision
(--checkpoint FOLDER: `EsmModel.from_pretrained` of an HF folder, as `hf download` leaves it, moved
to the device; without it, random weights built on the device), records sorted by length into
padded batches of at most --max-tokens tokens (padding counted), tokenized as EsmTokenizer does,
the mean of the last layer over each sequence's residues. Writes ids [N] and mean [N, D] float32
in input order. It imports torch, transformers and numpy only (run it by path to keep esmflash's
own import out of its wall clock).
"""

import argparse

import numpy as np
import torch
from transformers import EsmConfig, EsmModel

ARCH = {"esm2_t6_8M_UR50D": (6, 320, 20), "esm2_t12_35M_UR50D": (12, 480, 20), "esm2_t30_150M_UR50D": (30, 640, 20),
        "esm2_t33_650M_UR50D": (33, 1280, 20), "esm2_t36_3B_UR50D": (36, 2560, 40)}
VOCAB = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_fasta(path):
    records, rid, seq = [], None, []
    for line in open(path):
        if line.startswith(">"):
            if rid is not None:
                records.append((rid, "".join(seq)))
            rid, seq = line[1:].split()[0], []
        else:
            seq.append(line.strip())
    return records + ([(rid, "".join(seq))] if rid is not None else [])


def esm_config(name):
    layers, dim, heads = ARCH[name]
    return EsmConfig(vocab_size=len(VOCAB), hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * dim, hidden_act="gelu", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
                     position_embedding_type="rotary", emb_layer_norm_before=False, token_dropout=True,
                     pad_token_id=1, mask_token_id=32)


def batches(records, max_tokens):
    order = sorted(range(len(records)), key=lambda i: len(records[i][1]))
    batch = []
    for i in order:
        if batch and (len(records[i][1]) + 2) * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def embed(model, records, max_tokens, device):
    index = {tok: i for i, tok in enumerate(VOCAB)}
    means = [None] * len(records)
    for batch in batches(records, max_tokens):
        seqs = [records[i][1] for i in batch]
        ids = torch.ones(len(seqs), max(map(len, seqs)) + 2, dtype=torch.long)  # <pad>
        for row, seq in enumerate(seqs):
            ids[row, :len(seq) + 2] = torch.tensor([0] + [index.get(c, 3) for c in seq] + [2])
        ids = ids.to(device)
        hidden = model(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state.float()
        residues = ((ids != 1) & (ids != 0) & (ids != 2)).unsqueeze(-1).float()
        mean = ((hidden * residues).sum(1) / residues.sum(1)).cpu().numpy()
        for row, i in enumerate(batch):
            means[i] = mean[row]
    return np.stack(means)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fasta")
    p.add_argument("out")
    p.add_argument("--model", default="esm2_t33_650M_UR50D", choices=ARCH)
    p.add_argument("--precision", default="fp16", choices=DTYPES)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", help="an HF checkpoint folder (config.json + safetensors) of --model")
    args = p.parse_args(argv)
    if args.checkpoint:
        model = EsmModel.from_pretrained(args.checkpoint, dtype=DTYPES[args.precision], attn_implementation="sdpa",
                                         add_pooling_layer=False).to(args.device)
    else:
        with torch.device(args.device):
            model = EsmModel._from_config(esm_config(args.model), dtype=DTYPES[args.precision],
                                          attn_implementation="sdpa", add_pooling_layer=False)
    records = read_fasta(args.fasta)
    means = embed(model.eval(), records, args.max_tokens, args.device)
    np.savez(args.out, ids=np.array([r[0] for r in records]), mean=means.astype(np.float32))


if __name__ == "__main__":
    main()
