from openelm_mlx.apps.cli import main

main()
