# blocksel_strict(<target>): warnings as errors on project code only.
function(blocksel_strict target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic
    -Wshadow -Wnon-virtual-dtor -Wno-missing-field-initializers)
  if(BLOCKSEL_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
