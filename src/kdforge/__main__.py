from kdforge.cli import main

main()
