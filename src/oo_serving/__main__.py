from oo_serving.cli import main

main()
