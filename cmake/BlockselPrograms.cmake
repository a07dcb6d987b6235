# blocksel_install_program(<target>): installs an executable into bin/ so
# that the installed tree is relocatable. Its DT_RPATH is $ORIGIN/../lib;
# the loader honours DT_RPATH for the whole dependency tree, where CMake's
# default DT_RUNPATH covers only the executable's own NEEDED entries
# (libgrpc++ would look for libgrpc in the system). BlockselInstall gathers
# the shared libraries of every such program into lib/.
function(blocksel_install_program target)
  set_target_properties(${target} PROPERTIES INSTALL_RPATH "\$ORIGIN/../lib")
  target_link_options(${target} PRIVATE "LINKER:--disable-new-dtags")
  install(TARGETS ${target} RUNTIME_DEPENDENCY_SET blocksel_runtime RUNTIME DESTINATION bin)
endfunction()
