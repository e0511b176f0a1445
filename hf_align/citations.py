"""BibTeX of every paper hf-align implements, keyed by a short name; torch-free, so the trainer registry (and
``hf-align --help``) can read it without importing the heavy libraries. ``hf_align.hub`` re-exports it."""

import textwrap


__all__ = ["CITATIONS"]

CITATIONS = {
    "allo": textwrap.dedent("""\
        @article{chen2024allo,
            title   = {{Learning to Align by Forgetting and Improving: ALLO, Low-Redundant Alignment}},
            author  = {Zhipeng Chen and Kun Zhou and Wayne Xin Zhao and Jingyuan Wang and Ji-Rong Wen},
            journal = {arXiv preprint arXiv:2406.12606},
            year    = {2024},
        }"""),
    "npo": textwrap.dedent("""\
        @article{zhang2024npo,
            title   = {{Negative Preference Optimization: From Catastrophic Collapse to Effective Unlearning}},
            author  = {Ruiqi Zhang and Licong Lin and Yu Bai and Song Mei},
            journal = {arXiv preprint arXiv:2404.05868},
            year    = {2024},
        }"""),
    "aligner": textwrap.dedent("""\
        @article{ziheng2023aligner,
            title   = {{Aligner: One Global Token is Worth Millions of Parameters When Aligning Large Language Models}},
            author  = {Zhou Ziheng and Yingnian Wu and Song-Chun Zhu and Demetri Terzopoulos},
            journal = {arXiv preprint arXiv:2312.05503},
            year    = {2023},
        }"""),
    "ama": textwrap.dedent("""\
        @article{lin2023ama,
            title   = {{Mitigating the Alignment Tax of RLHF}},
            author  = {Yong Lin and Hangyu Lin and Wei Xiong and Shizhe Diao and others},
            journal = {arXiv preprint arXiv:2309.06256},
            year    = {2023},
        }"""),
    "kto": textwrap.dedent("""\
        @article{ethayarajh2024kto,
            title   = {{KTO: Model Alignment as Prospect Theoretic Optimization}},
            author  = {Kawin Ethayarajh and Winnie Xu and Niklas Muennighoff and Dan Jurafsky and Douwe Kiela},
            journal = {arXiv preprint arXiv:2402.01306},
            year    = {2024},
        }"""),
    "quark": textwrap.dedent("""\
        @inproceedings{lu2022quark,
            title     = {{Quark: Controllable Text Generation with Reinforced Unlearning}},
            author    = {Ximing Lu and Sean Welleck and Jack Hessel and Liwei Jiang and Lianhui Qin and Peter West and
                         Prithviraj Ammanabrolu and Yejin Choi},
            booktitle = {Advances in Neural Information Processing Systems},
            year      = {2022},
        }"""),
    "alt": textwrap.dedent("""\
        @article{lloret2024alt,
            title   = {{Towards Aligning Language Models with Textual Feedback}},
            author  = {Sa{\\"u}c Abadal Lloret and Shehzaad Dhuliawala and Keerthiram Murugesan and Mrinmaya Sachan},
            journal = {arXiv preprint arXiv:2407.16970},
            year    = {2024},
        }"""),
}
