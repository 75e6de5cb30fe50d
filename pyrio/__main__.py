from pyrio.cli import main

main()
