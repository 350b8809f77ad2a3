// The `svmemu` executable: the commands live in SVMEmuCLI, where the tests reach them.
import SVMEmuCLI

SVMEmuCommand.runAndExit()
