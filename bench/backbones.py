"""ImageNet backbones side by side: what each costs the R-CNN family on this machine.

    python bench/backbones.py [--config photos] [--backbones mobilenet_v2 efficientnet_lite0 ...]
        [--threads 2] [--repeats 3]

The work of bench/memory_format.py (R-CNN's features pass and fine-tuning step on the config's crops,
a Faster R-CNN training iteration and test pass on its image size), for each backbone in the layout the
stages run (channels-last, pipeline.models.on_device), random weights, the backbones alternated
--repeats times and the fastest of each kept. Rates relative to the first backbone are what carry over
to another machine: R-CNN's features and fine-tuning stages scale with the first two, Fast and Faster
R-CNN's training and test with the last two.
"""
from __future__ import annotations

import torch
from memory_format import bench_parser, fastest, rate, start, workloads_of

from pipeline.reports import markdown_table

DEFAULT_BACKBONES = ("mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def main() -> None:
    parser = bench_parser(__doc__.splitlines()[0], repeats=3)
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES,
                        help="backbone.name values; the first is the reference "
                             f"(default: {' '.join(DEFAULT_BACKBONES)})")
    args = parser.parse_args()
    config = start(args)
    workloads = {name: workloads_of(config, name) for name in args.backbones}
    seconds = {name: dict.fromkeys(workloads[name], float("inf")) for name in args.backbones}
    for _ in range(args.repeats):
        for name in args.backbones:
            for work_name, (work, model, _, _) in workloads[name].items():
                seconds[name][work_name] = min(seconds[name][work_name], fastest(work, model, torch.channels_last))
    reference = args.backbones[0]
    rows = []
    for work_name, (_, _, units, unit) in workloads[reference].items():
        rates = {name: units / seconds[name][work_name] for name in args.backbones}
        rows.append([work_name, unit, *(f"{rate(rates[name])} ({rates[name] / rates[reference]:.2f}x)"
                                        for name in args.backbones)])
    print(f"config {args.config}, channels-last, {args.threads} threads, fastest of {args.repeats}; "
          f"(rate relative to {reference})")
    print(markdown_table(["work", "unit", *args.backbones], rows))


if __name__ == "__main__":
    main()
