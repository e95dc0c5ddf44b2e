from edgemamba.cli import main

main()
