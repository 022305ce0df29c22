"""The JAM paper's own numbers for Tables 2-5, copied by hand from the paper's text (Aiello et al., ICLR 2024).

Why a module: they are the only numbers in the study's report that no run measured, so
they live in one place, keyed by the study's model names, and the report writes them
into the run folder as ``paper_tables.json`` next to the run's own JSON files. Table 4's
row without cross-attention is kept although the study does not run it.
"""

PAPER = {
    "source": "Aiello et al., Jointly Training Large Autoregressive Multimodal Models (JAM), ICLR 2024: "
              "Tables 2-5, copied from the paper's text",
    "parents": "7B LLM and 7B CM3leon, continued pretraining on 50B tokens (ablations: 25B)",
    # Table 2: Image-Text Comparison (MS-COCO PPL); the CM3leon row is the 7B image-text parent.
    "table2": {"rows": {"img-parent": {"size": "7B", "image_ppl": 149.0},
                        "uniform": {"size": "7B", "image_ppl": 177.5},
                        "width-copy": {"size": "26B", "image_ppl": 159.5},
                        "cross-k2": {"size": "19B", "image_ppl": 147.6}}},
    # Table 3: Ablations - JAM-Width Model (initialisation).
    "table3": {"rows": {"width-copy": {"text_ppl": 7.34, "image_ppl": 159.5},
                        "width-average": {"text_ppl": 9.0, "image_ppl": 175.4}}},
    # Table 4: Ablations - JAM-Cross Model (cross-attention every k layers; "no-cross" is the paper's X row).
    "table4": {"rows": {"no-cross": {"size": "13B", "text_ppl": 7.86, "image_ppl": 153.2},
                        "cross-k1": {"size": "26B", "text_ppl": 7.53, "image_ppl": 152.4},
                        "cross-k2": {"size": "19B", "text_ppl": 7.18, "image_ppl": 149.0},
                        "cross-k4": {"size": "16B", "text_ppl": 8.55, "image_ppl": 151.7}}},
    # Table 5: Ablations - Instruction Tuning (with / without Shutterstock image-text data).
    "table5": {"rows": {"instruct-only": {"image_ppl": 190.2},
                        "instruct-mixed": {"image_ppl": 164.5}}},
}
