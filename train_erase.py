#!/usr/bin/env python
"""Erase concepts from a Stable Diffusion model with MUNBa (the same command as the ``munba-erase`` console script).

    accelerate launch train_erase.py --concept nudity --output_dir sd14-no-nudity
    python train_erase.py --pretrained_model_name_or_path munba-demo --concept circle --output_dir demo-no-circle

``python train_erase.py --help`` lists every option; they are declared once in munba_diffusion/diffusion/config.py.
"""

from munba_diffusion.commands.erase import main

if __name__ == "__main__":
    main()
