#include "../emulation.h"
