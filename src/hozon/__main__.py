from hozon.cli.app import main

main()
