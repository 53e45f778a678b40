"""Lifelong editing benchmark, EasyEdit-script style (same flags as ``easyedit-nmke bench``).

EasyEdit's ``run_*_editing.py`` spellings work too::

    python examples/run_lifelong.py --editing_method NMKE --hparams_dir hparams/NMKE/smollm2-135m.yaml \\
        --data_dir ../shared/data/zsre_mend_eval_portability_gpt4.dev.json --ds_size 100 --sequential_edit

    python examples/run_lifelong.py --methods NMKE,NMKE:none,MEMIT --datasets zsre,counterfact \\
        --data-dir ../shared/data --eval-at 10,100 --out runs/bench --threads 1

Every (method, dataset) cell is one sequential run; results, resume and outputs are
described in ``easyedit_nmke/evaluate/bench.py`` and the README's "Benchmark" section.
"""
import sys

from easyedit_nmke.evaluate.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="examples/run_lifelong.py"))
