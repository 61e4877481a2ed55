from lightning_ckpt.cli import main

main()
